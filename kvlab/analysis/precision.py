"""Why KIVI quantizes keys per channel and values per token, measured on captured K/V.

For one (layer, kv head) with entries X (T, D):

* ``channel_outlier``: the largest per-channel |x| maximum over the median one (how much a few channels dominate);
  ``token_outlier``: the same over tokens (how much a few tokens dominate).
* ``err_per_channel`` / ``err_per_token``: relative reconstruction error ||X - X_hat|| / ||X|| after ``bits``-bit
  min-max quantization with groups of ``group`` tokens of one channel (per channel) or of ``group`` channels of one
  token (per token), the two groupings of :mod:`kvlab.cache.quantize`.

KIVI's observation: keys have a few outlier channels (large ``channel_outlier``), so a per-channel grouping gives
each of them its own range and the error is lower per channel; values have no channel structure and are mixed token
by token by the attention, so their error is lower, or no worse, per token.
"""

from __future__ import annotations

import pandas as pd
import torch

from ..cache.quantize import dequantize_blocks, dequantize_groups, quantize_blocks, quantize_groups


def grouping_errors(x: torch.Tensor, bits: int, group: int) -> tuple[float, float]:
    """(per-channel, per-token) relative error of ``x`` (T, D); T is cut to whole blocks of ``group``."""
    tokens = x.shape[0] - x.shape[0] % group
    x = x[:tokens].float()
    norm = float(x.norm()) or 1.0
    per_channel = dequantize_blocks(*quantize_blocks(x, bits, group), bits, torch.float32)
    per_token = dequantize_groups(*quantize_groups(x, bits, group), bits, torch.float32)
    return float((x - per_channel).norm()) / norm, float((x - per_token).norm()) / norm


def kv_distribution(keys: dict, values: dict, *, bits: int = 2, group: int = 32, skip: int = 0) -> pd.DataFrame:
    """One row per (layer, kv head, part) from captured ``keys`` / ``values`` {layer: (B, H_kv, T, D)} (batch rows
    concatenated along tokens; the first ``skip`` tokens of each row left out, e.g. the attention sinks)."""
    rows = []
    for part, captured in (("keys", keys), ("values", values)):
        for layer, t in captured.items():
            for head in range(t.shape[1]):
                x = t[:, head, skip:].reshape(-1, t.shape[-1]).float()  # (B x T, D)
                channel_max, token_max = x.abs().amax(0), x.abs().amax(1)
                err_c, err_t = grouping_errors(x, bits, group)
                rows.append(dict(layer=layer, head=head, part=part,
                                 channel_outlier=float(channel_max.max() / channel_max.median().clamp(min=1e-12)),
                                 token_outlier=float(token_max.max() / token_max.median().clamp(min=1e-12)),
                                 err_per_channel=err_c, err_per_token=err_t))
    return pd.DataFrame(rows)
