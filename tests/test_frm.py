"""FRM and the consistency loss L_r (docs/method.md#frm)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vsad_lightning.geometry.projection import neighbour_mask, pixel_to_grid_sample
from vsad_lightning.models.frm import FRM, consistency_loss


def translation(tx: float, ty: float) -> torch.Tensor:
    H = torch.eye(3)
    H[0, 2], H[1, 2] = tx, ty
    return H


def random_perspective(generator: torch.Generator) -> torch.Tensor:
    r = torch.rand(5, generator=generator, dtype=torch.float64) * 2 - 1
    a = math.radians(10 * r[0].item())
    return torch.tensor(
        [
            [math.cos(a), -math.sin(a), 1.5 * r[1].item()],
            [math.sin(a), math.cos(a), 1.5 * r[2].item()],
            [0.03 * r[3].item(), 0.03 * r[4].item(), 1.0],
        ]
    )


# ----------------------------------------------------------------------------- FRM
def test_frm_matches_the_concatenation_formula():
    g = torch.Generator().manual_seed(0)
    B, V, C, h, w = 2, 3, 12, 4, 5
    frm = FRM(C, hidden_channels=10, num_groups=8)
    with torch.no_grad():
        frm.out.weight.copy_(torch.randn(frm.out.weight.shape, generator=g))
        frm.out.bias.copy_(torch.randn(frm.out.bias.shape, generator=g))
    x = torch.randn(B, V, C, h, w, generator=g) * 2 + 1
    with torch.no_grad():
        ours = frm(x)
    # F_v = x_v + W_2 GELU(W_1 [GN(x_v); g]), with W_1 the stored halves side by side.
    gn = F.group_norm(x.flatten(0, 1), 4, frm.norm.weight, frm.norm.bias, frm.norm.eps)
    context = x.mean(dim=(1, 3, 4))  # mean over views of the per-view global average pool
    broadcast = context[:, None, :, None, None].expand(B, V, C, h, w).flatten(0, 1)
    W1 = torch.cat([frm.local_in.weight, frm.global_in.weight[:, :, None, None]], dim=1)
    hidden = F.conv2d(torch.cat([gn, broadcast], dim=1), W1, frm.local_in.bias)
    expected = x + F.conv2d(F.gelu(hidden), frm.out.weight, frm.out.bias).view(B, V, C, h, w)
    assert frm.norm.num_groups == math.gcd(8, C) == 4
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize(("channels", "groups"), [(48, 16), (7, 1), (64, 32), (320, 32)])
def test_frm_group_count_works_for_any_channel_count(channels, groups):
    frm = FRM(channels)
    assert frm.norm.num_groups == groups
    x = torch.randn(1, 2, channels, 3, 3)
    assert torch.equal(frm(x), x)  # identity at init


def test_frm_mixes_views_through_the_global_context():
    g = torch.Generator().manual_seed(1)
    frm = FRM(8, num_groups=4)
    with torch.no_grad():
        frm.out.weight.copy_(torch.randn(frm.out.weight.shape, generator=g))
    x = torch.randn(1, 3, 8, 4, 4, generator=g)
    changed = x.clone()
    changed[0, 2] += 3.0  # only view 2 changes
    with torch.no_grad():
        a, b = frm(x), frm(changed)
        assert not torch.allclose(a[0, 0], b[0, 0])  # view 0 sees it through g
        frm.global_in.weight.zero_()
        assert torch.allclose(frm(x)[0, 0], frm(changed)[0, 0])  # and only through g


def test_frm_identity_at_init_then_learns_in_two_steps():
    g = torch.Generator().manual_seed(2)
    frm = FRM(16, num_groups=4)
    x = torch.randn(2, 3, 16, 4, 4, generator=g)
    target = torch.randn(2, 3, 16, 4, 4, generator=g)
    assert torch.equal(frm(x), x)
    optimiser = torch.optim.AdamW(frm.parameters(), lr=1e-2)
    grads = []
    for _ in range(2):
        optimiser.zero_grad()
        loss = (frm(x) - target).pow(2).mean()
        loss.backward()
        grads.append({n: p.grad.abs().sum().item() for n, p in frm.named_parameters()})
        optimiser.step()
    assert grads[0]["out.weight"] > 0 and grads[0]["out.bias"] > 0
    assert all(grads[0][n] == 0 for n in grads[0] if not n.startswith("out."))  # W_2 = 0
    assert all(value > 0 for value in grads[1].values()), grads[1]
    with torch.no_grad():
        assert not torch.allclose(frm(x), x)


def test_frm_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(B, V, 8, h, w\)"):
        FRM(8)(torch.randn(1, 2, 7, 3, 3))


# ----------------------------------------------------------------------------- L_r
def test_grid_sample_convention_maps_pixel_centres_exactly():
    g = torch.Generator().manual_seed(3)
    h, w = 5, 7
    image = torch.randn(1, 2, h, w, generator=g)
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    centres = torch.stack([xs, ys], dim=-1)  # pixel-centre coordinates (x, y)
    grid = pixel_to_grid_sample(centres, w, h)[None]
    same = F.grid_sample(image, grid, mode="bilinear", align_corners=False)
    assert torch.allclose(same, image, atol=1e-6)
    # Half a pixel to the right of a centre: the mean of the two horizontal neighbours.
    shifted = pixel_to_grid_sample(centres + torch.tensor([0.5, 0.0]), w, h)[None]
    half = F.grid_sample(image, shifted, mode="bilinear", align_corners=False)
    assert torch.allclose(half[..., :-1], (image[..., :-1] + image[..., 1:]) / 2, atol=1e-6)


def shifted_consistent_features(generator: torch.Generator, C: int, h: int, w: int):
    """Two views with F_1(q) = F_0(q - t) for t = (+2, -1), random where undefined."""
    f0 = torch.randn(C, h, w, generator=generator)
    f1 = torch.randn(C, h, w, generator=generator)
    f1[:, 0 : h - 1, 2:w] = f0[:, 1:h, 0 : w - 2]  # f1[y, x] = f0[y + 1, x - 2]
    return torch.stack([f0, f1])[None]


def test_consistency_loss_is_zero_for_consistent_features_and_positive_otherwise():
    g = torch.Generator().manual_seed(4)
    C, h, w = 6, 10, 12
    features = shifted_consistent_features(g, C, h, w)
    H = torch.eye(3).repeat(1, 2, 2, 1, 1)
    H[0, 0, 1] = translation(2, -1)
    H[0, 1, 0] = translation(-2, 1)
    mask = ~torch.eye(2, dtype=torch.bool)
    assert consistency_loss(features, H, mask).item() < 1e-10
    # Feature scale does not matter (n is the L2 normalisation).
    assert consistency_loss(features * 7.5, H, mask).item() < 1e-10
    # Wrong geometry: clearly positive (random unit vectors differ by ~2 on average).
    wrong = H.clone()
    wrong[0, 0, 1] = translation(1, -1)
    wrong[0, 1, 0] = translation(-1, 1)
    assert consistency_loss(features, wrong, mask).item() > 0.5
    # Inconsistent features under the right geometry: positive too, and gradients flow.
    noisy = (features + 0.5 * torch.randn(features.shape, generator=g)).requires_grad_(True)
    loss = consistency_loss(noisy, H, mask)
    assert loss.item() > 0.01
    loss.backward()
    assert torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0


def reference_consistency_loss(features, H, mask):
    """L_r with explicit loops and hand-written bilinear sampling (border replication)."""
    B, V, C, h, w = features.shape
    Fd = features.double()
    total, count = 0.0, 0
    for b in range(B):
        for v in range(V):
            for u in range(V):
                if u == v or not mask[v, u]:
                    continue
                for py in range(h):
                    for px in range(w):
                        hom = H[b, v, u].double() @ torch.tensor([px + 0.5, py + 0.5, 1.0]).double()
                        if hom[2] <= 0:
                            continue
                        x, y = (hom[0] / hom[2]).item(), (hom[1] / hom[2]).item()
                        if not (0 <= x <= w and 0 <= y <= h):
                            continue
                        # Continuous index of the sample (pixel centres on integers), clamped
                        # to the outermost centres: that is padding_mode="border".
                        ix = min(max(x - 0.5, 0.0), w - 1.0)
                        iy = min(max(y - 0.5, 0.0), h - 1.0)
                        x0, y0 = math.floor(ix), math.floor(iy)
                        x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
                        fx, fy = ix - x0, iy - y0
                        sample = (
                            (1 - fx) * (1 - fy) * Fd[b, u, :, y0, x0]
                            + fx * (1 - fy) * Fd[b, u, :, y0, x1]
                            + (1 - fx) * fy * Fd[b, u, :, y1, x0]
                            + fx * fy * Fd[b, u, :, y1, x1]
                        )
                        a = Fd[b, v, :, py, px] / Fd[b, v, :, py, px].norm()
                        total += ((a - sample / sample.norm()) ** 2).sum().item()
                        count += 1
    return total / count


def test_consistency_loss_matches_loop_reference_under_perspective():
    g = torch.Generator().manual_seed(5)
    B, V, C, h, w = 2, 3, 5, 6, 7
    H = torch.eye(3).repeat(B, V, V, 1, 1)
    for b in range(B):
        for v in range(V):
            for u in range(V):
                if u != v:
                    H[b, v, u] = random_perspective(g)
    H[1, 0, 2] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.25, 0.0, 1.0]])  # w<0, x>4
    mask = torch.tensor([[False, True, True], [True, False, False], [True, True, False]])
    features = torch.randn(B, V, C, h, w, generator=g)
    ours = consistency_loss(features, H, mask)
    expected = reference_consistency_loss(features, H, mask)
    assert abs(ours.item() - expected) < 1e-5, (ours.item(), expected)


def test_consistency_loss_without_valid_pairs_is_zero_with_gradient():
    features = torch.randn(1, 3, 4, 5, 5, requires_grad=True)
    H = torch.eye(3).repeat(1, 3, 3, 1, 1)
    for mask in (torch.zeros(3, 3, dtype=torch.bool), neighbour_mask("all", 3)):
        H_off = H.clone()
        if mask.any():
            H_off[0, :, :, 0, 2] = 50.0  # every projection lands off the map
            H_off[0, torch.arange(3), torch.arange(3)] = torch.eye(3)
        loss = consistency_loss(features, H_off, mask)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        loss.backward()
        assert torch.equal(features.grad, torch.zeros_like(features))


def test_consistency_loss_under_bf16_autocast_and_validation():
    g = torch.Generator().manual_seed(6)
    features = torch.randn(1, 3, 8, 6, 6, generator=g)
    H = torch.eye(3).repeat(1, 3, 3, 1, 1)
    H[0, 0, 1] = translation(0.7, -0.3)
    mask = neighbour_mask("all", 3)
    exact = consistency_loss(features, H, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = consistency_loss(features.bfloat16(), H, mask)
    assert low.dtype == torch.float32
    assert abs(low.item() - exact.item()) < 0.02 * exact.item()
    with pytest.raises(ValueError, match="homographies"):
        consistency_loss(features, H[:, :2, :2], mask)
    with pytest.raises(ValueError, match="neighbour_mask"):
        consistency_loss(features, H, mask.float())
