"""Feature-axis compression: keys and values stored projected onto a per-(layer, kv-head) orthonormal basis.

For kv head h with key basis U (D, r) and value basis W (D, r_v) the cache stores the codes k @ U and v @ W.
Attention with the query projected by the same U (shared by the query heads of a GQA group),
    softmax((q U)(k U)^T * s) (v W) W^T  ==  softmax(q (k U U^T)^T * s) (v W W^T),
so the torch reference reconstructs K_hat = (k U) U^T and V_hat = (v W) W^T transiently and runs ordinary attention;
only the codes stay in memory. Ranks may differ per head (ragged storage: one tensor per head, no padding to the
largest rank). Pending entries, full-rank sink copies, reads and bytes: :class:`~kvlab.methods.coded.CodedLayer`.
"""

from __future__ import annotations

import torch

from .coded import CodedLayer


class ProjectedLayer(CodedLayer):
    def __init__(self, layer_idx: int, key_bases: list[torch.Tensor], value_bases: list[torch.Tensor], sinks: int = 0):
        """``key_bases[h]``: (D, r_h) with orthonormal columns; ``value_bases[h]``: (D, r_v_h)."""
        super().__init__(layer_idx, sinks)
        if len(key_bases) != len(value_bases):
            raise ValueError(f"{len(key_bases)} key bases but {len(value_bases)} value bases")
        self.key_bases, self.value_bases = list(key_bases), list(value_bases)
        self.key_codes: list[torch.Tensor] = []  # per head (B, T, r_h)
        self.value_codes: list[torch.Tensor] = []

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.key_bases, self.value_bases, self.sinks)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        if len(self.key_bases) != self.n_heads:
            raise ValueError(f"layer {self.layer_idx}: {len(self.key_bases)} bases for {self.n_heads} kv heads")

    def _append_codes(self, keys, values) -> None:
        for h, (u, w) in enumerate(zip(self.key_bases, self.value_bases)):
            k_code = keys[:, h] @ u.to(keys.dtype)  # (B, T_new, r_h)
            v_code = values[:, h] @ w.to(values.dtype)
            if self.length:
                self.key_codes[h] = torch.cat([self.key_codes[h], k_code], dim=1)
                self.value_codes[h] = torch.cat([self.value_codes[h], v_code], dim=1)
            else:
                self.key_codes.append(k_code)
                self.value_codes.append(v_code)

    def _decode_all(self):
        keys = torch.stack([c @ u.to(c.dtype).T for c, u in zip(self.key_codes, self.key_bases)], dim=1)
        values = torch.stack([c @ w.to(c.dtype).T for c, w in zip(self.value_codes, self.value_bases)], dim=1)
        return keys, values  # (B, H_kv, T, D), fresh tensors

    def code_tensors(self):
        return self.key_codes + self.value_codes

    def dims_kept(self, part: str, head: int) -> int:
        return (self.key_bases if part == "K" else self.value_bases)[head].shape[1]

    def _select_codes(self, indices) -> None:
        self.key_codes = [c[indices] for c in self.key_codes]
        self.value_codes = [c[indices] for c in self.value_codes]


def check_orthonormal(basis: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    gram = basis.T.float() @ basis.float()
    if not torch.allclose(gram, torch.eye(gram.shape[0]), atol=atol):
        raise ValueError(f"{what} must have orthonormal columns (max |U^T U - I| = {(gram - torch.eye(len(gram))).abs().max():.2e})")
