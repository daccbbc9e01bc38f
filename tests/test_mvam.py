"""MVAM (docs/method.md#mvam): candidate geometry, exactness vs a loop reference, init, dtypes."""

from __future__ import annotations

import math

import cv2
import kornia
import numpy as np
import pytest
import torch

from vsad_lightning.geometry.projection import (
    neighbour_mask,
    pixel_centre_grid,
    scale_homography,
)
from vsad_lightning.models.mvam import (
    MVAM,
    candidate_bytes,
    candidate_geometry,
    frequency_embedding,
    gather_candidates,
    neighbour_groups,
    other_views,
)


def translation(tx: float, ty: float) -> torch.Tensor:
    H = torch.eye(3)
    H[0, 2], H[1, 2] = tx, ty
    return H


def perspective_homography(angle_deg: float, tx: float, ty: float, px: float, py: float):
    a = math.radians(angle_deg)
    return torch.tensor(
        [
            [math.cos(a), -math.sin(a), tx],
            [math.sin(a), math.cos(a), ty],
            [px, py, 1.0],
        ],
        dtype=torch.float64,
    )


def random_homographies(B: int, V: int, generator: torch.Generator) -> torch.Tensor:
    """Small rotations, translations of a few pixels and real perspective terms."""
    H = torch.eye(3, dtype=torch.float64).repeat(B, V, V, 1, 1)
    for b in range(B):
        for v in range(V):
            for u in range(V):
                if u == v:
                    continue
                r = torch.rand(5, generator=generator, dtype=torch.float64) * 2 - 1
                H[b, v, u] = perspective_homography(
                    15 * r[0].item(), 2 * r[1].item(), 2 * r[2].item(), 0.04 * r[3], 0.04 * r[4]
                )
    return H.float()


def set_random_output(module: MVAM, generator: torch.Generator, std: float = 0.5) -> None:
    with torch.no_grad():
        w = torch.randn(module.to_out.weight.shape, generator=generator) * std
        module.to_out.weight.copy_(w)
        module.to_out.bias.copy_(torch.randn(module.to_out.bias.shape, generator=generator))


# ----------------------------------------------------------------------------- geometry
def test_integer_translation_gathers_the_translated_neighbourhood():
    B, V, D, h, w, R = 1, 3, 4, 7, 8, 3
    r = R // 2
    H = torch.eye(3).repeat(B, V, V, 1, 1)
    H[0, 0, 1] = translation(2, -1)  # view 0 -> view 1: +2 columns, -1 row
    H[0, 1, 0] = translation(-2, 1)
    mask = torch.tensor([[False, True, False], [True, False, True], [True, True, False]])
    values = torch.randn(B, V, D, h, w)
    cands = gather_candidates(values, H, mask, R)
    K = 1 + (V - 1) * R * R
    assert cands.values.shape == (B, V, h * w, K, D)
    assert cands.valid.shape == (B, V, h * w, K)
    assert cands.offsets.shape == (B, V, h * w, K, 2)

    # Self candidate: always valid, own value, zero offset (every view, every position).
    n = torch.arange(h * w)
    assert cands.valid[..., 0].all()
    assert torch.equal(cands.offsets[..., 0, :], torch.zeros(B, V, h * w, 2))
    assert torch.equal(cands.source_view[..., 0], torch.arange(V).view(1, V, 1).expand(B, V, h * w))
    assert torch.equal(cands.source_index[..., 0], n.expand(B, V, -1))
    own = values.permute(0, 1, 3, 4, 2).reshape(B, V, h * w, D)
    assert torch.equal(cands.values[..., 0, :], own)

    # View 0 -> neighbour 1 (slot j = 0): the R x R grid around (x + 2, y - 1).
    interior_seen = 0
    for y in range(h):
        for x in range(w):
            p = y * w + x
            centre = 1 + 0 * R * R + r * R + r
            assert torch.equal(cands.offsets[0, 0, p, centre], torch.zeros(2))
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    k = 1 + (dy + r) * R + (dx + r)
                    qx, qy = x + 2 + dx, y - 1 + dy
                    inside = 0 <= qx < w and 0 <= qy < h
                    assert bool(cands.valid[0, 0, p, k]) == inside, (x, y, dx, dy)
                    assert torch.equal(cands.offsets[0, 0, p, k], torch.tensor([dx, dy]).float())
                    if inside:
                        assert cands.source_view[0, 0, p, k] == 1
                        assert cands.source_index[0, 0, p, k] == qy * w + qx
                        assert torch.equal(cands.values[0, 0, p, k], values[0, 1, :, qy, qx])
            if 1 <= y - 1 < h - 1 and 1 <= x + 2 < w - 1:
                interior_seen += 1
                assert cands.valid[0, 0, p, 1 : 1 + R * R].all()
    assert interior_seen > 0
    # View 1 -> view 0 is the inverse translation: pixel (2, 0) reads pixel (0, 1) of view 0.
    assert cands.source_view[0, 1, 0 * w + 2, 1 + r * R + r] == 0
    assert cands.source_index[0, 1, 0 * w + 2, 1 + r * R + r] == 1 * w + 0
    # Non-neighbours are masked: 0 -> 2 (slot 1 of view 0) and 2 -> 2 is not a candidate at all.
    assert not cands.valid[0, 0, :, 1 + R * R :].any()
    assert cands.valid[0, 2, :, 1:].any()  # 2 -> 0 and 2 -> 1 are neighbours (identity H)


def test_half_pixel_projection_uses_the_containing_pixel():
    # p̂ on a pixel boundary (x = 3.0): the grid is centred on pixel 3, the one that contains it.
    H = torch.eye(3).repeat(1, 2, 2, 1, 1)
    H[0, 0, 1] = translation(0.5, 0.0)
    geometry = candidate_geometry(H, ~torch.eye(2, dtype=torch.bool), 3, 4, 6)
    p = 1 * 6 + 2  # centre (2.5, 1.5) -> (3.0, 1.5)
    centre = 1 + 4
    assert geometry.source_index[0, 0, p, centre] == 1 * 6 + 3
    assert torch.allclose(geometry.offsets[0, 0, p, centre], torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize("size", [(8, 8), (16, 12), (32, 32)])
def test_projection_agrees_with_kornia_and_opencv(size):
    W_img, H_img = 256, 192
    w, h = size
    H_full = torch.eye(3, dtype=torch.float64).repeat(1, 3, 3, 1, 1)
    H_full[0, 0, 1] = perspective_homography(12.0, 20.0, -10.0, 4e-4, -3e-4)
    H_full[0, 1, 0] = torch.linalg.inv(H_full[0, 0, 1])
    H_full[0, 2, 0] = perspective_homography(-8.0, -15.0, 12.0, -2e-4, 5e-4)
    H_full[0, 0, 2] = torch.linalg.inv(H_full[0, 2, 0])
    H_full[0, 1, 2] = perspective_homography(25.0, -30.0, 8.0, 6e-4, 2e-4)
    H_full[0, 2, 1] = torch.linalg.inv(H_full[0, 1, 2])
    H_level = scale_homography(H_full.float(), (W_img, H_img), (w, h))
    geometry = candidate_geometry(H_level, ~torch.eye(3, dtype=torch.bool), 3, h, w)

    centres = pixel_centre_grid(w, h)
    others = other_views(3)
    # OpenCV puts pixel centres on integers: H_cv = T^-1 H T with T a +0.5 shift.
    T = torch.eye(3, dtype=torch.float64)
    T[:2, 2] = 0.5
    to_image = torch.tensor([W_img / w, H_img / h], dtype=torch.float64)
    for v in range(3):
        for j in range(2):
            u = others[v, j].item()
            ours = geometry.projected[0, v, j]
            by_kornia = kornia.geometry.transform_points(H_level[0, v, u][None], centres[None])[0]
            assert torch.allclose(ours, by_kornia, atol=1e-4), (v, u)
            # OpenCV at image resolution on the unscaled H: an independent check of the scaling.
            H_cv = (torch.linalg.inv(T) @ H_full[0, v, u] @ T).numpy()
            pts = (centres.double() * to_image - 0.5).numpy().reshape(-1, 1, 2)
            by_cv = cv2.perspectiveTransform(pts, H_cv).reshape(-1, 2) + 0.5
            by_cv = torch.from_numpy(by_cv) / to_image
            assert torch.allclose(ours.double(), by_cv, atol=1e-4), (v, u)
            # And the candidate offsets are measured from exactly these points (wherever the
            # candidate is valid; offsets of invalid candidates are unused).
            centre_k = 1 + j * 9 + 4
            valid = geometry.valid[0, v, :, centre_k]
            assert valid.any()
            expected = torch.floor(ours) + 0.5 - ours
            assert torch.allclose(geometry.offsets[0, v, valid, centre_k], expected[valid])


def test_points_behind_the_camera_are_invalid():
    H = torch.eye(3).repeat(1, 2, 2, 1, 1)
    H[0, 0, 1] = torch.diag(torch.tensor([1.0, 1.0, -1.0]))  # w = -1 everywhere
    geometry = candidate_geometry(H, ~torch.eye(2, dtype=torch.bool), 3, 5, 5)
    assert not geometry.valid[0, 0, :, 1:].any()
    assert geometry.valid[0, 1, :, 1:].any()


# ----------------------------------------------------------------------------- exactness
def reference_mvam(module: MVAM, x: torch.Tensor, H: torch.Tensor, mask: torch.Tensor):
    """docs/method.md#mvam steps 1-5 written out with explicit loops, in float64."""
    B, V, C, h, w = x.shape
    R, r, heads, dh, L = (
        module.window,
        module.window // 2,
        module.num_heads,
        module.head_dim,
        module.num_frequencies,
    )
    X = x.double()
    Wq = module.to_q.weight[:, :, 0, 0].double()
    Wk = module.to_k.weight[:, :, 0, 0].double()
    Wv = module.to_v.weight[:, :, 0, 0].double()
    Pk, Pv = module.pos_k.weight.double(), module.pos_v.weight.double()
    Wo, bo = module.to_out.weight[:, :, 0, 0].double(), module.to_out.bias.double()

    def gamma(dx: float, dy: float) -> torch.Tensor:
        feats = []
        for k in range(L):
            f = (2**k) * math.pi / R
            feats += [math.sin(f * dx), math.cos(f * dx), math.sin(f * dy), math.cos(f * dy)]
        return torch.tensor(feats, dtype=torch.float64)

    out = X.clone()
    for b in range(B):
        for v in range(V):
            for py in range(h):
                for px in range(w):
                    query = Wq @ X[b, v, :, py, px]
                    keys = [Wk @ X[b, v, :, py, px] + Pk @ gamma(0.0, 0.0)]
                    vals = [Wv @ X[b, v, :, py, px] + Pv @ gamma(0.0, 0.0)]
                    for u in range(V):
                        if u == v or not mask[v, u]:
                            continue
                        hom = H[b, v, u].double() @ torch.tensor([px + 0.5, py + 0.5, 1.0]).double()
                        if hom[2] <= 0:
                            continue
                        hx, hy = (hom[0] / hom[2]).item(), (hom[1] / hom[2]).item()
                        cx, cy = round(hx - 0.5), round(hy - 0.5)  # the brief's formula
                        for dy in range(-r, r + 1):
                            for dx in range(-r, r + 1):
                                qx, qy = cx + dx, cy + dy
                                if not (0 <= qx < w and 0 <= qy < h):
                                    continue
                                g = gamma(qx + 0.5 - hx, qy + 0.5 - hy)
                                keys.append(Wk @ X[b, u, :, qy, qx] + Pk @ g)
                                vals.append(Wv @ X[b, u, :, qy, qx] + Pv @ g)
                    keys_t, vals_t = torch.stack(keys), torch.stack(vals)
                    mixed = torch.zeros(module.attention_dim, dtype=torch.float64)
                    for head in range(heads):
                        s = slice(head * dh, (head + 1) * dh)
                        a = torch.softmax(keys_t[:, s] @ query[s] / math.sqrt(dh), dim=0)
                        mixed[s] = a @ vals_t[:, s]
                    out[b, v, :, py, px] += Wo @ mixed + bo
    return out


def test_matches_explicit_loop_reference():
    g = torch.Generator().manual_seed(0)
    B, V, C, h, w = 2, 3, 8, 5, 6
    module = MVAM(C, attention_dim=8, num_heads=2, window=3, num_frequencies=3)
    set_random_output(module, g)
    with torch.no_grad():
        for p in (module.pos_k.weight, module.pos_v.weight):
            p.copy_(torch.randn(p.shape, generator=g))  # make γ matter
    H = random_homographies(B, V, g)
    # w < 0 for x > 3.3: part of this pair's projections lie behind the camera.
    H[1, 2, 0] = torch.tensor([[1.0, 0.1, 0.5], [0.0, 1.0, -0.3], [-0.3, 0.05, 1.0]])
    mask = torch.tensor([[False, True, True], [True, False, False], [True, True, False]])
    x = torch.randn(B, V, C, h, w, generator=g)

    geometry = candidate_geometry(H, mask, 3, h, w)
    neighbour_valid = geometry.valid[..., 1:]
    assert neighbour_valid.any() and not neighbour_valid.all()  # a real mix of cases
    expected = reference_mvam(module, x, H, mask)
    with torch.no_grad():
        ours = module(x, H, mask)
        # float64 end to end (the geometry follows the homographies' dtype): exact semantics.
        ours64 = module.double()(x.double(), H.double(), mask)
    assert torch.allclose(ours64, expected, atol=1e-10, rtol=0), (ours64 - expected).abs().max()
    # float32: the same up to float32 rounding (outputs are O(5); 1e-5 absolute is ~2 ulp).
    error = (ours.double() - expected).abs().max()
    assert error < 1e-5 * max(1.0, expected.abs().max().item()), error
    assert (ours - x).abs().max() > 0.1  # W_o is non-zero: the test is not vacuous


def test_equivariant_under_a_permutation_of_the_views():
    """Reordering the views, with their homographies and neighbour mask, reorders the output
    the same way: MVAM has no per-view parameters and each view attends to the views its
    homographies point at, whatever their index."""
    g = torch.Generator().manual_seed(3)
    B, V, C, h, w = 2, 4, 8, 6, 7
    module = MVAM(C, attention_dim=8, num_heads=2, window=3, num_frequencies=3)
    set_random_output(module, g)
    with torch.no_grad():
        for p in (module.pos_k.weight, module.pos_v.weight):
            p.copy_(torch.randn(p.shape, generator=g))
    H = random_homographies(B, V, g)
    mask = torch.tensor(
        [[0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool
    )  # not symmetric under the permutation: the mask must move with the views
    x = torch.randn(B, V, C, h, w, generator=g)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = module(x, H, mask)
        moved = module(x[:, perm], H[:, perm][:, :, perm], mask[perm][:, perm])
        # Permuting the features alone (stale homographies) is not the same computation.
        stale = module(x[:, perm], H, mask[perm][:, perm])
    torch.testing.assert_close(moved, out[:, perm], rtol=0, atol=1e-5)
    assert (stale - out[:, perm]).abs().max() > 1e-2
    assert (out - x).abs().max() > 0.1  # W_o is non-zero: the test is not vacuous


def test_layout_cache_reuses_the_geometry_with_identical_outputs_and_gradients():
    """``layout_cache``: the second MVAM of a call reuses the first one's geometry; outputs and
    gradients equal those of uncached calls, and a new map size gets its own entry."""
    g = torch.Generator().manual_seed(1)
    B, V, C = 2, 3, 8
    first, second = (MVAM(C, attention_dim=8, num_heads=2) for _ in range(2))
    for module in (first, second):
        set_random_output(module, g)
    H = random_homographies(B, V, g)
    mask = ~torch.eye(V, dtype=torch.bool)
    x = torch.randn(B, V, C, 5, 6, generator=g, requires_grad=True)

    def run(cache):
        y = second(first(x, H, mask, layout_cache=cache), H, mask, layout_cache=cache)
        (grad,) = torch.autograd.grad(y.square().sum(), x)
        return y, grad

    cache: dict = {}
    y_cached, grad_cached = run(cache)
    y_plain, grad_plain = run(None)
    assert len(cache) == 1
    torch.testing.assert_close(y_cached, y_plain, rtol=0, atol=0)
    torch.testing.assert_close(grad_cached, grad_plain, rtol=0, atol=0)
    first(torch.randn(B, V, C, 4, 4), H, mask, layout_cache=cache)
    assert len(cache) == 2


def test_frequency_embedding_values():
    emb = frequency_embedding(torch.tensor([[0.0, 0.0], [1.5, -0.5]]), window=3, num_frequencies=2)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([0.0, 1, 0, 1, 0, 1, 0, 1]))
    f0, f1 = math.pi / 3, 2 * math.pi / 3
    expected = [
        math.sin(f0 * 1.5),
        math.cos(f0 * 1.5),
        math.sin(-f0 * 0.5),
        math.cos(-f0 * 0.5),
        math.sin(f1 * 1.5),
        math.cos(f1 * 1.5),
        math.sin(-f1 * 0.5),
        math.cos(-f1 * 0.5),
    ]
    assert torch.allclose(emb[1], torch.tensor(expected), atol=1e-6)


# ----------------------------------------------------------------------------- init, training
def test_identity_at_init_then_learns_in_two_steps():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    B, V, C, h, w = 1, 3, 12, 6, 6
    module = MVAM(C, attention_dim=8, num_heads=2)
    x = torch.randn(B, V, C, h, w, generator=g)
    H = random_homographies(B, V, g)
    target = torch.randn(B, V, C, h, w, generator=g)
    assert torch.equal(module(x, H), x)

    optimiser = torch.optim.AdamW(module.parameters(), lr=1e-2)
    grads = []
    for _ in range(2):
        optimiser.zero_grad()
        loss = (module(x, H) - target).pow(2).mean()
        loss.backward()
        grads.append({n: p.grad.abs().sum().item() for n, p in module.named_parameters()})
        optimiser.step()
    # Step 0: W_o = 0 blocks every other parameter's gradient (documented in mvam.py).
    assert grads[0]["to_out.weight"] > 0 and grads[0]["to_out.bias"] > 0
    assert all(grads[0][n] == 0 for n in grads[0] if not n.startswith("to_out"))
    # Step 1: every parameter learns.
    assert all(value > 0 for value in grads[1].values()), grads[1]
    with torch.no_grad():
        assert not torch.allclose(module(x, H), x)


def test_softmax_support_without_any_neighbour_candidate():
    g = torch.Generator().manual_seed(4)
    B, V, C, h, w = 1, 3, 6, 4, 5
    module = MVAM(C, attention_dim=4, num_heads=2)
    set_random_output(module, g)
    x = torch.randn(B, V, C, h, w, generator=g)
    H = torch.eye(3).repeat(B, V, V, 1, 1)
    H[0, 0, 1] = translation(100.0, 0.0)  # lands far outside the map
    H[0, 0, 2] = torch.diag(torch.tensor([1.0, 1.0, -1.0]))  # behind the camera
    H[0, 1, 0] = translation(-100.0, 0.0)
    mask = torch.tensor([[False, True, True], [False, False, False], [True, True, False]])
    with torch.no_grad():
        out = module(x, H, mask)
    assert torch.isfinite(out).all()
    # Views 0 (neighbours off-map/behind) and 1 (no neighbours): attention is all on self, so
    # the update is W_o (W_v x + P_v γ(0)) + b_o.
    gamma0 = frequency_embedding(torch.zeros(2), module.window, module.num_frequencies)
    for v in (0, 1):
        xv = x[0, v].reshape(C, -1)
        self_value = module.to_v.weight[:, :, 0, 0] @ xv + (module.pos_v.weight @ gamma0)[:, None]
        expected = xv + module.to_out.weight[:, :, 0, 0] @ self_value + module.to_out.bias[:, None]
        assert torch.allclose(out[0, v].reshape(C, -1), expected, atol=1e-5)


def test_single_view_is_self_attention_only():
    module = MVAM(4, attention_dim=4, num_heads=1)
    x = torch.randn(2, 1, 4, 3, 3)
    out = module(x, torch.eye(3).repeat(2, 1, 1, 1, 1))
    assert torch.equal(out, x)


def test_neighbour_mask_override_and_validation():
    g = torch.Generator().manual_seed(5)
    B, V, C = 1, 5, 6
    ring = neighbour_mask("ring", V)
    module = MVAM(C, attention_dim=4, num_heads=2, neighbour_mask=ring)
    set_random_output(module, g)
    x = torch.randn(B, V, C, 4, 4, generator=g)
    H = random_homographies(B, V, g)
    with torch.no_grad():
        default = module(x, H)
        explicit = module(x, H, ring)
        everyone = module(x, H, neighbour_mask("all", V))
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, everyone)
    with pytest.raises(ValueError, match="neighbour_mask"):
        module(x, H, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="homographies"):
        module(x, H[:, :4, :4])
    with pytest.raises(ValueError, match=r"\(B, V, 6, h, w\)"):
        module(x[:, :, :5], H)
    with pytest.raises(ValueError, match="divisible"):
        MVAM(C, attention_dim=6, num_heads=4)
    with pytest.raises(ValueError, match="odd"):
        MVAM(C, window=2)


# ----------------------------------------------------------------------------- dtypes, memory
def test_bf16_autocast_matches_fp32_loosely():
    g = torch.Generator().manual_seed(6)
    B, V, C, h, w = 1, 3, 16, 6, 6
    module = MVAM(C, attention_dim=8, num_heads=2)
    set_random_output(module, g, std=0.3)
    x = torch.randn(B, V, C, h, w, generator=g)
    H = random_homographies(B, V, g)
    reference = module(x, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(x, H)
    assert torch.isfinite(low).all()
    update_ref, update_low = reference - x, low.float() - x
    scale = update_ref.abs().max()
    assert (update_low - update_ref).abs().max() < 0.05 * scale
    low.float().sum().backward()
    assert module.to_out.weight.grad is not None
    assert torch.isfinite(module.to_out.weight.grad).all()


def test_candidate_bytes_scale_with_attention_dim_not_channels():
    small = candidate_bytes(1, 5, 16, 16, attention_dim=64)
    wide = candidate_bytes(1, 5, 16, 16, attention_dim=128)
    assert small["candidates"] == 1 + 4 * 9
    assert small["gathered_kv"] == 5 * 256 * 37 * 2 * 64 * 4
    assert wide["gathered_kv"] == 2 * small["gathered_kv"]
    # The gathered tensors are what the formula says, for any channel count.
    for channels in (8, 32):
        module = MVAM(channels, attention_dim=8, num_heads=2)
        x = torch.randn(1, 3, channels, 4, 4)
        qkv = torch.randn(1, 3, 8, 4, 4)
        cands = gather_candidates(qkv, torch.eye(3).repeat(1, 3, 3, 1, 1), module_mask(3), 3)
        expected = candidate_bytes(1, 3, 4, 4, attention_dim=8)["gathered_kv"] // 2
        assert cands.values.numel() * cands.values.element_size() == expected
        assert module(x, torch.eye(3).repeat(1, 3, 3, 1, 1)).shape == x.shape


def module_mask(views: int) -> torch.Tensor:
    return ~torch.eye(views, dtype=torch.bool)


def test_geometry_works_with_float64_homographies_and_many_views():
    # Data pipelines may hand float64 homographies; the geometry casts them once.
    H = torch.eye(3, dtype=torch.float64).repeat(2, 5, 5, 1, 1)
    geometry = candidate_geometry(H, neighbour_mask("top_and_ring", 5), 3, 4, 4)
    assert geometry.valid.shape == (2, 5, 16, 1 + 4 * 9)
    # Side view 1 is not a neighbour of side view 3 in top_and_ring: that slot is masked.
    j = (other_views(5)[1] == 3).nonzero().item()
    assert not geometry.valid[:, 1, :, 1 + j * 9 : 1 + (j + 1) * 9].any()
    np.testing.assert_array_equal(geometry.valid[:, 1, 5, 1 + 4].numpy(), [True, True])


def test_neighbour_pairs_only_top_and_ring_matches_the_masked_full_layout():
    """``top_and_ring`` on 5 views: the top view (4 neighbours) and the ring views (3) are two
    groups, 149 candidates instead of 185; the output equals the masked all-views layout's."""
    groups = neighbour_groups(neighbour_mask("top_and_ring", 5))
    assert [(v.tolist(), p.shape[1]) for v, p in groups] == [([0], 4), ([1, 2, 3, 4], 3)]
    assert sum(v.numel() * (1 + p.shape[1] * 9) for v, p in groups) == 149
    g = torch.Generator().manual_seed(3)
    module = MVAM(8, attention_dim=8, num_heads=2)
    set_random_output(module, g)
    H = random_homographies(1, 5, g)
    x = torch.randn(1, 5, 8, 4, 5, generator=g)
    mask = neighbour_mask("top_and_ring", 5)
    expected = reference_mvam(module, x, H, mask)
    with torch.no_grad():
        ours = module.double()(x.double(), H.double(), mask)
    assert torch.allclose(ours, expected, atol=1e-10, rtol=0), (ours - expected).abs().max()
