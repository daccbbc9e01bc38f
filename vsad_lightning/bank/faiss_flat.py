"""faiss ``IndexFlatL2`` (exact, k=1) as a search backend: opt-in, never chosen by ``auto``.

On the 2-core CPU where it was measured, the torch search was 4-9x faster than pip's faiss-cpu
(README, Performance); it stays for users whose faiss build is faster. Same argmin, then the same
direct recomputation (``common.exact_distance``), so the same values as the torch search.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from vsad_lightning.bank.common import bank_stats, centred_chunks, per_bank

_FAISS_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def faiss_available() -> bool:
    """Whether ``import faiss`` works (the optional ``faiss`` extra, faiss-cpu)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_index(bank: Tensor, mean: Tensor):
    """An ``IndexFlatL2`` over the centred bank, cached per bank object like ``bank_stats``.

    The index holds a float32 copy of the bank (faiss stores its own vectors), so the cache
    costs ``4 N D`` bytes for as long as the bank tensor lives.
    """
    import faiss

    def build():
        index = faiss.IndexFlatL2(bank.shape[1])
        for _, centred in centred_chunks(bank.detach().cpu(), mean):
            index.add(centred.numpy())
        return index

    return per_bank(_FAISS_CACHE, bank, build)


def argmin_faiss(queries: Tensor, bank: Tensor) -> Tensor:
    """``(Q,)`` index of each query's nearest bank row, searched by faiss on the CPU."""
    stats = bank_stats(bank)
    mean = stats.mean.cpu()
    index = _faiss_index(bank, mean)
    centred = queries.detach().cpu().float() - mean
    _, labels = index.search(centred.numpy(), 1)
    return torch.from_numpy(labels[:, 0]).to(device=queries.device, dtype=torch.long)
