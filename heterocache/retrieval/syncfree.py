"""The block refill without a host synchronisation (the CUDA path of ``RetrievalEngine.swap_blocks``).

``swap_blocks`` pairs the incoming pages of a step with the freed unit slots through ``torch.nonzero``,
whose output size the host must read: on a GPU every retrieving layer of every decode step waits for
the device there. Here the same pairing has fixed shapes ``(n, width)``:

- ``chosen`` sorted per row; ``incoming = ~resident[chosen]`` (a chosen page not resident yet) and
  ``free = ~wanted[current]`` (a unit slot whose page is not wanted again); per row both sets have the
  same size (``width`` chosen pages, ``width`` slots, the pages that stay are in both);
- a stable sort puts each row's incoming pages first (ascending page number) and its free slots first
  (ascending slot), so the k-th incoming page goes to the k-th free slot: exactly ``swap_blocks``'s
  row-major pairing; entries past the row's count are marked invalid and copy nothing.

The copy of the valid pairs is one kernel launch (:func:`fetch_blocks`): the Triton kernel reads the
tier's pages straight from pinned host memory (mapped into the device's address space) and writes the
unit slots, masked per pair, so only incoming pages cross the link; its PyTorch reference
(:func:`fetch_blocks_reference`, the CPU path and what the kernel is tested against) gathers every
pair and writes back the old contents where the pair is invalid. The bytes moved are counted on the
device and read when ``stats()`` asks (``RetrievalEngine.fold``).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def pair_blocks(resident: torch.Tensor, current: torch.Tensor, chosen: torch.Tensor):
    """``resident (n, P)`` bool, ``current (n, k)`` the page in each unit slot, ``chosen (n, k)`` distinct
    pages per row -> ``(wanted (n, P), src (n, k) page, dst (n, k) unit slot, valid (n, k) bool)``:
    pair ``j`` of a row moves page ``src[j]`` into slot ``dst[j]`` where ``valid[j]``."""
    wanted = torch.zeros_like(resident).scatter_(1, chosen, True)
    ordered = chosen.sort(dim=1).values
    incoming = ~resident.gather(1, ordered)
    free = ~wanted.gather(1, current)
    first_in = torch.sort((~incoming).to(torch.uint8), dim=1, stable=True).indices
    dst = torch.sort((~free).to(torch.uint8), dim=1, stable=True).indices
    src = ordered.gather(1, first_in)
    arange = torch.arange(chosen.shape[1], device=chosen.device)
    valid = arange[None, :] < incoming.sum(1, keepdim=True)
    return wanted, src, dst, valid


def fetch_blocks_reference(tier_keys, tier_values, page_positions, out_keys, out_values, out_positions,
                           src, dst, valid) -> None:
    """Write the valid pairs: page ``r * P + src`` of ``tier_keys/values (n * P, unit * D)`` (``tier_keys``
    None: values only) and ``page_positions (n * P, unit)`` into unit slot ``r * S + dst`` of
    ``out_keys/values (n * S, unit * D)``, ``out_positions (n * S, unit)``; invalid pairs rewrite
    their slot's own contents (``dst`` is a permutation per row, so no slot is written twice)."""
    n, k = src.shape
    pages = page_positions.shape[0] // n
    slots = out_values.shape[0] // n
    rows = torch.arange(n, device=src.device)[:, None]
    source = (rows * pages + src).reshape(-1)
    target = (rows * slots + dst).reshape(-1)
    keep = valid.reshape(-1, 1)
    pairs = [(tier_values, out_values), (page_positions, out_positions)]
    if tier_keys is not None:
        pairs.append((tier_keys, out_keys))
    for tier, out in pairs:
        new = tier.index_select(0, source).to(out.dtype)
        old = out.index_select(0, target)
        out.index_copy_(0, target, torch.where(keep, new, old))


if triton is not None:

    @triton.jit
    def _fetch_blocks_kernel(tier_keys, tier_values, page_positions, out_keys, out_values, out_positions,
                             src, dst, valid, width, pages, slots,
                             ROW: tl.constexpr, UNIT: tl.constexpr, UNIT_P2: tl.constexpr,
                             BLOCK: tl.constexpr, HAS_KEYS: tl.constexpr):
        pid = tl.program_id(0)
        row = pid // width
        ok = tl.load(valid + pid).to(tl.int32)  # 1: copy this pair; 0: the masks below are empty
        source = row.to(tl.int64) * pages + tl.load(src + pid)
        target = row.to(tl.int64) * slots + tl.load(dst + pid)
        for start in range(0, ROW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < ROW * ok
            value = tl.load(tier_values + source * ROW + offs, mask=mask)
            tl.store(out_values + target * ROW + offs, value.to(out_values.dtype.element_ty), mask=mask)
            if HAS_KEYS:
                key = tl.load(tier_keys + source * ROW + offs, mask=mask)
                tl.store(out_keys + target * ROW + offs, key.to(out_keys.dtype.element_ty), mask=mask)
        offs = tl.arange(0, UNIT_P2)
        mask = offs < UNIT * ok
        position = tl.load(page_positions + source * UNIT + offs, mask=mask)
        tl.store(out_positions + target * UNIT + offs, position.to(out_positions.dtype.element_ty), mask=mask)


def fetch_blocks(tier_keys, tier_values, page_positions, out_keys, out_values, out_positions,
                 src, dst, valid) -> None:
    """:func:`fetch_blocks_reference` as one Triton launch (one program per pair; an invalid pair loads
    and stores nothing). The tier tensors may be pinned host memory (read over the link by the
    kernel), everything else on the device; all contiguous."""
    n, k = src.shape
    row = tier_values.shape[1]
    unit = page_positions.shape[1]
    has_keys = tier_keys is not None
    _fetch_blocks_kernel[(n * k,)](
        tier_keys if has_keys else tier_values, tier_values, page_positions,
        out_keys if has_keys else out_values, out_values, out_positions,
        src.contiguous(), dst.contiguous(), valid.to(torch.int8).contiguous(), k,
        page_positions.shape[0] // n, out_values.shape[0] // n,
        ROW=row, UNIT=unit, UNIT_P2=triton.next_power_of_2(unit), BLOCK=min(1024, triton.next_power_of_2(row)),
        HAS_KEYS=has_keys)
