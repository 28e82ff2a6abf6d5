"""An interactive explorer of one model's KV cache under one method: pick model, method, budget (and options), layer
and kv head; see the head's spectrum and the ranks kept, the attention map of a prompt with the kept / evicted tokens
or the projected error, the measured bytes vs full, and the perplexity of a short text vs full.

Everything expensive is done once and cached: the model, one capture of the prompt (keys, values, queries of every
layer), each method's fitted tensors (shipped artefacts, so no fitting on the default methods), and each (method,
budget, options) measurement, so a change of layer or head answers in milliseconds and a change of budget or method
in about a second on a 2-core CPU. ``notebooks/10_explorer.py`` is the notebook; under the report's runner
(``$KVLAB_NOTEBOOK`` set) :meth:`Explorer.show` renders one selection statically instead of widgets.

    ex = Explorer("smollm2")
    view = ex.compute("pca", 0.5, layer=15, head=0)   # a View: spectrum, ranks, attention maps, bytes, ppl
    ex.figure(view); ex.show()                          # a matplotlib figure; the widgets (in JupyterLab)
"""

from __future__ import annotations

import dataclasses
import html
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

METHODS = ("full", "pca", "matryoshka", "streaming", "h2o", "snapkv")
PROJECTION = ("pca", "matryoshka")  # feature axis: a basis per (layer, kv head), ranks kept
EVICTION = ("streaming", "h2o", "snapkv")  # token axis: tokens kept per (layer, kv head)
BUDGETS = (0.125, 0.25, 0.5, 0.75, 1.0)
MODELS = ("smollm2", "gemma3-270m")


def model_fetched(name: str) -> bool:
    """True if bundled model ``name`` is on disk (converted, or its package verified), without fetching anything."""
    from .data import fetch as _unused  # noqa: F401  (package import)
    import importlib

    fetch = importlib.import_module("kvlab.data.fetch")
    from .models import BUNDLED

    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; choose from {', '.join(BUNDLED)}")
    converted = fetch.data_dir() / "models" / name
    if (converted / "model.safetensors").exists() and (converted / "tokenizer.json").exists():
        return True
    manifest = fetch.load_manifest()
    artefact = BUNDLED[name]
    return fetch._stamp_ok(fetch.data_dir() / artefact, manifest[artefact])


def check_fetched(name: str) -> None:
    """FileNotFoundError saying how to fetch bundled model ``name`` if it is not on disk."""
    if not model_fetched(name):
        raise FileNotFoundError(f"model {name!r} is not fetched yet: run `kvlab fetch {name}` in a terminal (about "
                                "300 MB from PyPI, once), then pick it again")


def parse_options(text: str) -> dict:
    """``"sinks=0, recent_frac=0.25"`` -> {"sinks": 0, "recent_frac": 0.25} (values as JSON where they parse)."""
    import json

    options = {}
    for pair in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"options are key=value pairs separated by commas, got {pair!r}")
        raw = raw.strip()
        try:
            options[key.strip()] = json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


@dataclass
class View:
    """What one selection shows. Arrays are numpy; ``attention`` is (T, T) for the first query head of the kv head."""

    model: str
    method: str
    budget: float
    options: dict
    layer: int
    head: int
    tokens: list[str]  # the prompt's tokens, for the axes
    spectrum: dict[str, np.ndarray]  # part -> energy captured by the first r directions, r = 1..D
    ranks: dict[str, int]  # part -> features kept for this head (D for methods that keep every feature)
    attention: np.ndarray  # (T, T) the method's attention map of the prompt (full map with evicted columns zeroed)
    full_attention: np.ndarray  # (T, T) the full cache's
    kept: np.ndarray | None  # (H_kv, T) bool, tokens kept per kv head of the layer (eviction methods)
    bytes: dict[str, int]  # full / measured / theoretical of the prompt's cache
    ppl: float
    ppl_full: float
    protocol: str
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def byte_ratio(self) -> float:
        return self.bytes["measured"] / self.bytes["full"]

    @property
    def ppl_ratio(self) -> float:
        return self.ppl / self.ppl_full

    def summary(self) -> dict:
        return {"model": self.model, "method": self.method, "budget": self.budget, "options": self.options,
                "layer": self.layer, "head": self.head, "ranks": self.ranks, "bytes": self.bytes,
                "byte_ratio": self.byte_ratio, "ppl": self.ppl, "ppl_full": self.ppl_full,
                "ppl_ratio": self.ppl_ratio, "protocol": self.protocol,
                "attention_error": float(np.abs(self.attention - self.full_attention).sum(-1).mean() / 2),
                "seconds": self.seconds}


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    spec: object
    prompt: torch.Tensor  # (1, T)
    chunks: torch.Tensor  # (N, chunk_len) perplexity text
    capture: object  # keys, values, queries of every layer for the prompt
    scaling: list[float]  # per layer


class Explorer:
    """Cached state behind the widgets (and a plain Python API): see the module docstring."""

    def __init__(self, model: str = "smollm2", *, prompt_tokens: int = 128, ppl_chunks: int = 1, chunk_len: int = 256,
                 corpus: str = "wiki", seed: int = 0):
        if prompt_tokens < 8 or ppl_chunks < 1 or chunk_len < 16:
            raise ValueError(f"need prompt_tokens >= 8, ppl_chunks >= 1, chunk_len >= 16; got {prompt_tokens}, "
                             f"{ppl_chunks}, {chunk_len}")
        self.model_name = model
        self.prompt_tokens, self.ppl_chunks, self.chunk_len, self.corpus, self.seed = (
            prompt_tokens, ppl_chunks, chunk_len, corpus, seed)
        self._loaded: dict[str, _Loaded] = {}
        self._prepared: dict[tuple, object] = {}
        self._measured: dict[tuple, dict] = {}
        self._full_ppl: dict[tuple, float] = {}
        self.timings: list[dict] = []  # one row per answered change: what changed, seconds

    # ------------------------------------------------------------------------------------------ state
    def load(self, name: str | None = None, progress: Callable[[str], None] | None = None) -> _Loaded:
        """Model, tokenizer, prompt, perplexity text and the prompt's capture for model ``name`` (cached)."""
        from . import data
        from .capturing import attention_modules, capture
        from .models import BUNDLED, ModelSpec, load_model

        name = name or self.model_name
        if name in self._loaded:
            return self._loaded[name]
        if name in BUNDLED:
            check_fetched(name)
        _say(progress, f"loading {name} and capturing the prompt ...")
        model, tok = load_model(name)
        spec = ModelSpec.from_model(model)
        text = data.text(self.corpus, split="eval")[:20_000]
        prompt = tok(text, return_tensors="pt")["input_ids"][:, : self.prompt_tokens]  # (1, T)
        if prompt.shape[1] < self.prompt_tokens:
            raise ValueError(f"the {self.corpus} eval text has only {prompt.shape[1]} tokens for the prompt")
        chunks = data.text_chunks(self.corpus, tok, chunk_len=self.chunk_len, n_chunks=self.ppl_chunks, split="eval")
        with torch.no_grad():
            cap = capture(model, prompt, what=("keys", "values", "queries"))
        modules = attention_modules(model)
        scaling = [float(getattr(modules[i], "scaling", spec.head_dim ** -0.5)) for i in range(spec.n_layers)]
        self._loaded[name] = _Loaded(model, tok, spec, prompt, chunks, cap, scaling)
        return self._loaded[name]

    def method(self, name: str, budget: float, options: dict | None = None, *, model: str | None = None,
               progress: Callable[[str], None] | None = None):
        """The prepared method (fitted tensors cached per model, method and options; budgets share them)."""
        from . import methods

        if name not in METHODS:
            raise ValueError(f"the explorer shows methods {', '.join(METHODS)}; got {name!r}")
        if not 0 < float(budget) <= 1:
            raise ValueError(f"budget must be in (0, 1] (fraction of the full cache's bytes), got {budget}")
        options = dict(options or {})
        if name == "full" and options:
            raise ValueError(f"method 'full' takes no options (got {', '.join(options)}); pick pca, matryoshka, "
                             "streaming, h2o or snapkv to compress")
        loaded = self.load(model, progress)
        key = (model or self.model_name, name, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in self._prepared:
            built = methods.get(name, None if name == "full" else budget, **options)  # ValueError on bad options
            if name in PROJECTION:
                _say(progress, f"preparing {name} (shipped bases if they fit {key[0]}, else fitting) ...")
                built.prepare(loaded.model, loaded.tokenizer)
            self._prepared[key] = built
        base = self._prepared[key]
        if name == "full":
            return base
        if name in PROJECTION:
            return base.with_budget(budget) if hasattr(base, "with_budget") else dataclasses.replace(base, budget=budget)
        return dataclasses.replace(base, budget=budget)

    def _measure(self, name: str, budget: float, options: dict, model: str | None, progress) -> dict:
        """Bytes of the prompt's cache, kept masks (eviction) and perplexity: cached per (model, method, budget, options)."""
        from .eval.perplexity import PROTOCOLS, perplexity

        key = (model or self.model_name, name, float(budget), tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key in self._measured:
            return self._measured[key]
        loaded = self.load(model, progress)
        method = self.method(name, budget, options, model=model, progress=progress)
        spec, lm = loaded.spec, loaded.model
        _say(progress, f"measuring the bytes of {name} at {budget:g} ...")
        tic = time.perf_counter()
        mask = torch.ones_like(loaded.prompt)
        kept = None
        with torch.no_grad(), method.apply(lm) as cache:
            lm(loaded.prompt, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
            if name in EVICTION:
                method.compress(cache, model=lm, attention_mask=mask)
                T = loaded.prompt.shape[1]
                kept = torch.zeros(spec.n_layers, spec.n_kv_heads, T, dtype=torch.bool)  # (L, H_kv, T)
                for i, layer in enumerate(cache.layers):
                    pos = layer.kept_positions(mask)[0]  # (H_kv, C), -1 = empty slot
                    for h in range(spec.n_kv_heads):
                        kept[i, h, pos[h][pos[h] >= 0]] = True
            b = cache.kv_bytes()
        seconds_bytes = time.perf_counter() - tic
        protocol = getattr(method, "protocols", PROTOCOLS)[0]
        _say(progress, f"perplexity of {name} at {budget:g} on {loaded.chunks.numel()} tokens ({protocol}) ...")
        tic = time.perf_counter()
        ppl = perplexity(lm, loaded.tokenizer, method, loaded.chunks, protocol=protocol, progress=False)["ppl"]
        fkey = (key[0], protocol)
        if fkey not in self._full_ppl:
            from .methods import Full

            self._full_ppl[fkey] = perplexity(lm, loaded.tokenizer, Full(), loaded.chunks, protocol=protocol,
                                              progress=False)["ppl"]
        result = {"bytes": {"full": int(b.full), "measured": int(b.measured), "theoretical": int(b.theoretical)},
                  "kept": kept, "ppl": float(ppl), "ppl_full": float(self._full_ppl[fkey]), "protocol": protocol,
                  "method": method, "seconds": {"bytes": seconds_bytes, "ppl": time.perf_counter() - tic}}
        self._measured[key] = result
        return result

    # ------------------------------------------------------------------------------------------ one view
    def compute(self, method: str = "pca", budget: float = 0.5, options: dict | str | None = None, layer: int = 0,
                head: int = 0, *, model: str | None = None, progress: Callable[[str], None] | None = None) -> View:
        """Everything one selection shows (see :class:`View`). ValueError / FileNotFoundError on a bad selection."""
        tic = time.perf_counter()
        options = parse_options(options) if isinstance(options, str) else dict(options or {})
        loaded = self.load(model, progress)
        spec = loaded.spec
        if not 0 <= layer < spec.n_layers or not 0 <= head < spec.n_kv_heads:
            raise ValueError(f"layer must be in 0..{spec.n_layers - 1} and kv head in 0..{spec.n_kv_heads - 1}, got "
                             f"layer {layer}, head {head}")
        m = self._measure(method, float(budget), options, model, progress)
        built = m["method"]
        cap = loaded.capture
        keys, values = cap.keys[layer][0, head], cap.values[layer][0, head]  # (T, D)
        query = cap.queries[layer][0, head * spec.group_size]  # (T, D) first query head of the group
        D = spec.head_dim
        if method in PROJECTION:
            key_ranks, value_ranks = built.ranks(spec)
            ranks = {"keys": int(key_ranks[layer, head]), "values": int(value_ranks[layer, head])}
            bases = {"keys": built.key_bases[layer, head], "values": built.value_bases[layer, head]}  # (D, D)
            sinks = int(built.sinks)
        else:
            ranks = {"keys": D, "values": D}
            bases = {p: _eigenbasis(x) for p, x in (("keys", keys), ("values", values))}
            sinks = 0
        spectrum = {p: _energy(x, bases[p]) for p, x in (("keys", keys), ("values", values))}
        full_attention = _attention(query, keys, loaded.scaling[layer])
        if method in PROJECTION:
            u = bases["keys"][:, : ranks["keys"]]  # (D, r)
            projected = keys @ u @ u.T  # (T, D) what the scores see
            projected[:sinks] = keys[:sinks]  # sinks stay at full rank
            attention = _attention(query, projected, loaded.scaling[layer])
        elif m["kept"] is not None:
            attention = full_attention * m["kept"][layer, head].float().numpy()[None, :]
        else:
            attention = full_attention
        tokens = [loaded.tokenizer.decode([t]) for t in loaded.prompt[0].tolist()]
        view = View(model or self.model_name, method, float(budget), options, layer, head, tokens, spectrum, ranks,
                    attention, full_attention, None if m["kept"] is None else m["kept"][layer].numpy(), m["bytes"],
                    m["ppl"], m["ppl_full"], m["protocol"], dict(m["seconds"]))
        view.seconds["total"] = time.perf_counter() - tic
        return view

    def figure(self, view: View):
        """A 2 x 2 figure: spectrum with the ranks kept, attention map, error or kept tokens, bytes and perplexity."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(11, 8), gridspec_kw={"height_ratios": [1.2, 1]})
        ax = axes[0, 0]
        for part, color in (("keys", "C0"), ("values", "C1")):
            r = np.arange(1, len(view.spectrum[part]) + 1)
            ax.plot(r, view.spectrum[part], color=color, label=f"{part} (kept {view.ranks[part]})")
            ax.axvline(view.ranks[part], color=color, ls="--", lw=1)
        basis = "the method's basis" if view.method in PROJECTION else "the prompt's own PCA basis"
        ax.set(xlabel="rank (features kept)", ylabel="energy captured", ylim=(0, 1.02),
               title=f"layer {view.layer}, kv head {view.head}: spectrum in {basis}")
        ax.legend(loc="lower right")
        ax = axes[0, 1]
        from matplotlib.colors import PowerNorm

        im = ax.imshow(view.attention, cmap="magma", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), aspect="auto")
        fig.colorbar(im, ax=ax, label="attention probability")
        what = {"full": "full cache", **{p: f"projected keys (rank {view.ranks['keys']})" for p in PROJECTION},
                **{e: "evicted columns zeroed" for e in EVICTION}}[view.method]
        ax.set(xlabel="key position", ylabel="query position", title=f"attention map of the prompt: {what}")
        ax.grid(False)
        ax = axes[1, 0]
        if view.kept is not None:
            ax.imshow(view.kept.astype(float), cmap="Greens", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.grid(False)
            ax.set(xlabel="prompt position", ylabel="kv head", yticks=range(view.kept.shape[0]),
                   title=f"kept (green) / evicted (white) tokens, layer {view.layer}: {view.kept[view.head].sum()} of "
                         f"{view.kept.shape[1]} in head {view.head}")
        else:
            err = np.abs(view.attention - view.full_attention)
            im = ax.imshow(err, cmap="viridis", aspect="auto")
            fig.colorbar(im, ax=ax, label="|p - p_full|")
            ax.grid(False)
            ax.set(xlabel="key position", ylabel="query position",
                   title=f"attention error vs full (mean total variation {err.sum(-1).mean() / 2:.3f})")
        ax = axes[1, 1]
        labels = ["bytes / full", "perplexity / full"]
        ratios = [view.byte_ratio, view.ppl_ratio]
        bars = ax.bar(labels, ratios, color=["C2", "C3"])
        ax.axhline(1.0, color="k", lw=1, ls="--")
        for bar, text in zip(bars, (f"{view.byte_ratio:.3f}\n{view.bytes['measured'] / 2**10:.0f} of "
                                    f"{view.bytes['full'] / 2**10:.0f} KiB",
                                    f"{view.ppl_ratio:.3f}\n{view.ppl:.2f} vs {view.ppl_full:.2f}")):
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
        ax.set(ylabel="ratio to the full cache", ylim=(0, max(1.3, max(ratios) * 1.3)),
               title=f"measured bytes ({len(view.tokens)}-token prompt); perplexity ({view.protocol})")
        fig.suptitle(f"{view.model} · {view.method} at budget {view.budget:g}"
                     + (f" · {', '.join(f'{k}={v}' for k, v in view.options.items())}" if view.options else ""))
        fig.tight_layout()
        return fig

    def table(self, methods=("full", "pca", "h2o"), budgets=(0.5, 0.25), *, model: str | None = None):
        """Bytes and perplexity vs full for every (method, budget): a DataFrame."""
        import pandas as pd

        rows = []
        for name in methods:
            for budget in ((1.0,) if name == "full" else budgets):
                m = self._measure(name, float(budget), {}, model, None)
                rows.append({"method": name, "budget": budget, "bytes_ratio": m["bytes"]["measured"] / m["bytes"]["full"],
                             "theoretical_ratio": m["bytes"]["theoretical"] / m["bytes"]["full"],
                             "ppl": m["ppl"], "ppl_full": m["ppl_full"], "ppl_ratio": m["ppl"] / m["ppl_full"],
                             "protocol": m["protocol"]})
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------------------------------ widgets
    def widget(self, method: str = "pca", budget: float = 0.5, layer: int | None = None, head: int = 0):
        """The explorer as ipywidgets (a VBox); every change recomputes only what it has to."""
        import ipywidgets as w
        from IPython.display import display

        loaded = self.load()
        spec = loaded.spec
        layer = spec.n_layers // 2 if layer is None else layer
        c = {
            "model": w.Dropdown(options=MODELS, value=self.model_name, description="model"),
            "method": w.Dropdown(options=METHODS, value=method, description="method"),
            "budget": w.Dropdown(options=[(f"{b:g}", b) for b in BUDGETS], value=budget, description="budget"),
            "options": w.Text(value="", placeholder="key=value, ... (e.g. sinks=0)", description="options",
                              continuous_update=False),
            "layer": w.IntSlider(value=layer, min=0, max=spec.n_layers - 1, description="layer",
                                 continuous_update=False),
            "head": w.IntSlider(value=head, min=0, max=spec.n_kv_heads - 1, description="kv head",
                                continuous_update=False),
        }
        for name, control in c.items():
            control.add_class(f"kvlab-{name}")
        status = w.HTML(value="").add_class("kvlab-status")
        bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="", layout=w.Layout(width="30%"))
        numbers = w.HTML(value="").add_class("kvlab-numbers")
        out = w.Output().add_class("kvlab-figure")
        state = {"n": 0}

        def progress(message: str) -> None:
            bar.value = min(0.9, bar.value + 0.25)
            status.value = f"<span class='kvlab-busy'>⏳ {html.escape(message)}</span>"

        def update(change=None) -> None:
            import matplotlib.pyplot as plt

            changed = change["owner"].description if change else "start"
            state["n"] += 1
            tic = time.perf_counter()
            bar.value, bar.bar_style = 0.05, "info"
            try:
                model = c["model"].value
                if model != self.model_name or model not in self._loaded:
                    new = self.load(model, progress)
                    self.model_name = model
                    c["layer"].max, c["head"].max = new.spec.n_layers - 1, new.spec.n_kv_heads - 1
                view = self.compute(c["method"].value, c["budget"].value, c["options"].value, c["layer"].value,
                                    c["head"].value, model=model, progress=progress)
            except (ValueError, FileNotFoundError, TypeError, RuntimeError) as e:
                bar.value, bar.bar_style = 1.0, "danger"
                status.value = (f"<span class='kvlab-error' style='color:#b00'>Cannot show this combination: "
                                f"{html.escape(str(e))}</span>")
                numbers.value = "<span class='kvlab-bytes'>—</span> <span class='kvlab-ppl'>—</span>"
                return
            fig = self.figure(view)
            with out:
                out.clear_output(wait=True)
                display(fig)
            plt.close(fig)
            seconds = time.perf_counter() - tic
            self.timings.append({"change": changed, "seconds": seconds, "method": view.method, "budget": view.budget})
            bar.value, bar.bar_style = 1.0, "success"
            status.value = (f"<span class='kvlab-done' data-n='{state['n']}'>answered in "
                            f"<span class='kvlab-seconds'>{seconds:.2f}</span> s (change: {html.escape(changed)})"
                            "</span>")
            numbers.value = _numbers_html(view)

        for control in c.values():
            control.observe(update, names="value")
        update()
        top = w.HBox([c["model"], c["method"], c["budget"], c["options"]])
        return w.VBox([top, w.HBox([c["layer"], c["head"], bar]), status, numbers, out]).add_class("kvlab-explorer")

    def show(self, static: bool | None = None, **selection):
        """Display the widgets in a live Jupyter; a static figure + numbers when ``static`` (default: under the report
        runner, i.e. ``$KVLAB_NOTEBOOK`` set, where nobody could move a widget). Returns the View in static mode."""
        from IPython.display import HTML, display

        if static is None:
            static = bool(os.environ.get("KVLAB_NOTEBOOK"))
        if not static:
            display(self.widget(**selection))
            return None
        import matplotlib.pyplot as plt

        from .plotting import savefig

        view = self.compute(selection.get("method", "pca"), selection.get("budget", 0.5), selection.get("options"),
                            selection.get("layer", self.load().spec.n_layers // 2), selection.get("head", 0))
        display(HTML("<p><i>Static rendering (no live kernel for widgets here): open notebooks/10_explorer.py in "
                     "JupyterLab (<code>make lab</code>) to change the selection.</i></p>" + _numbers_html(view)))
        fig = self.figure(view)
        savefig(fig, "explorer")
        plt.show()
        return view


def _say(progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _numbers_html(view: View) -> str:
    return (f"<div>bytes: <b class='kvlab-bytes'>{view.byte_ratio:.4f}</b> of full "
            f"({view.bytes['measured']:,} of {view.bytes['full']:,} bytes measured, theoretical "
            f"{view.bytes['theoretical']:,}) · perplexity: <b class='kvlab-ppl'>{view.ppl:.3f}</b> vs full "
            f"{view.ppl_full:.3f} (x{view.ppl_ratio:.3f}, {view.protocol}) · ranks kept K {view.ranks['keys']} / "
            f"V {view.ranks['values']}</div>")


def _eigenbasis(x: torch.Tensor) -> torch.Tensor:
    """(D, D) eigenvectors of x^T x, columns by decreasing eigenvalue; x (T, D)."""
    values, vectors = torch.linalg.eigh(x.double().T @ x.double())
    return vectors.flip(-1).to(x.dtype)


def _energy(x: torch.Tensor, basis: torch.Tensor) -> np.ndarray:
    """Share of sum ||x_t||^2 captured by the first r columns of ``basis`` (D, D), r = 1..D; x (T, D)."""
    coords = (x.double() @ basis.double()).pow(2).sum(0)  # (D,)
    return (coords.cumsum(0) / x.double().pow(2).sum()).clamp(max=1.0).numpy()


def _attention(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> np.ndarray:
    """Causal softmax(q k^T * scaling): (T, T) numpy; query, keys (T, D)."""
    scores = (query.float() @ keys.float().T) * scaling  # (T, T)
    causal = torch.ones_like(scores, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1).numpy()
