"""A model split across devices: every method runs each layer's step where that layer's weights are, and
gives the numbers of the same model on one device.

With CUDA, a tiny model's layers are split between the CPU and ``cuda:0``, in both orders (the embedding with
the first layers, the final norm and unembedding with the last): a ``HookedTransformer`` by moving its modules
and routing the residual stream between blocks as TransformerLens's multi-device forward does
(``residual.to(get_device_for_block_index(i, cfg))`` before block ``i``, ``cfg.n_devices``), a bridge by
dispatching its ``transformers`` model with accelerate, which is what a ``device_map`` does (TransformerLens 4.3
refuses a ``device_map`` that mixes the CPU with a GPU, so it cannot load this split itself). Every registered
method, and DPA's options, must then equal the unsplit model's results to 1e-5, gathered on the embedding's
device. Without CUDA these tests skip.

On the CPU alone: `ModelView.layer_device` is each block's weights' device and `ModelView.split` sees a split
(a block moved to the meta device); the split code path, forced on a one-device model, gives the plain path's
numbers for every method; and DPA's sweep asks each layer's device before that layer's steps.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import dpa_lens
from dpa_lens import Attribution, Circuit
from dpa_lens.forward import CachedForward, read_forward
from dpa_lens.inputs import prepare_tokens
from dpa_lens.methods.dpa.hooks import required_hooks
from dpa_lens.methods.dpa.rules import Propagator
from dpa_lens.models import tl
from dpa_lens.models.view import ModelView
from tests.helpers import CORRUPTED, IOI_PROMPT, LINES, PAIR, make_tiny

CPU = torch.device("cpu")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="splitting a model between the CPU and cuda:0 needs a CUDA device")
N_LAYERS = 4
SPLITS = {"cpu_then_cuda": ("cpu", "cpu", "cuda:0", "cuda:0"), "cuda_then_cpu": ("cuda:0", "cuda:0", "cpu", "cpu")}
# options that keep the slow methods quick and their numbers free of adaptive choices
OPTIONS = {"integrated_gradients": {"steps": 16, "quadrature": "trapezoid", "warn_gap": float("inf")},
           "activation_patching": {"unit": "heads"}}
TOL = {"rtol": 1e-5, "atol": 1e-5}


# ---------------------------------------------------------------------------------------------- comparing results
def _tensors(result) -> dict[str, torch.Tensor]:
    """Every tensor of a result (scores, values, per-position and per-key fields, effective targets, diagnostics)."""
    out = {}
    for name in [*type(result).AXES, *getattr(type(result), "ROW_DICTS", ())]:
        value = getattr(result, name, None)
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update({f"{name}[{k}]": v for k, v in value.items() if isinstance(v, torch.Tensor)})
    for name, value in vars(result.diagnostics).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():  # not counts of what a pruned search found
            out[f"diagnostics.{name}"] = value
    return out


def _same(got, want, **tol) -> None:
    """``got`` has the tensors of ``want``, equal within ``tol`` (both read on the CPU)."""
    assert type(got) is type(want)
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name].detach().cpu(), b[name].detach().cpu()
        if x.is_floating_point():
            torch.testing.assert_close(x.float(), y.float(), equal_nan=True, msg=lambda m, name=name: f"{name}: {m}", **(tol or TOL))
        else:
            assert torch.equal(x, y), name


def _on(result, device: torch.device) -> None:
    """Every score and value of a result is on ``device`` (the split model's results are gathered there)."""
    for name, t in _tensors(result).items():
        if t.is_floating_point() and not name.startswith("diagnostics"):
            assert t.device == device, f"{name} is on {t.device}, not {device}"


def _run(name: str, model, **extra):
    spec = dpa_lens.get_method(name)
    corrupted = CORRUPTED if spec.input == "pair" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpa_lens.run(name, model, IOI_PROMPT, PAIR, corrupted=corrupted, progress=False, **{**OPTIONS.get(name, {}), **extra})


def _dpa_options(model) -> dict[str, object]:
    """DPA's sweep in its other forms: flow and effective targets, per-key heads, neurons against resid_mid, a
    checkpointed cache, rerooting, edges with neurons and positions, contrastive edges, paths, a padded batch."""
    tokens = model.to_tokens(IOI_PROMPT)
    _, cache = model.run_with_cache(tokens)
    _, corrupted = model.run_with_cache(model.to_tokens(CORRUPTED))
    direction = torch.linspace(-1, 1, model.cfg.d_model)
    out: dict[str, object] = {
        "flow": dpa_lens.dpa(model, cache, PAIR, flow=True, effective_targets=True, head_keys=True, neuron_target="mid"),
        "root_pre": dpa_lens.dpa(model, cache, direction, root="blocks.2.hook_resid_pre"),
        "root_head": dpa_lens.dpa(model, cache, direction, root="L2H1"),
        "edges": dpa_lens.dpa_edges(model, cache, PAIR, neurons=True, per_position=True),
        "edges_root": dpa_lens.dpa_edges(model, cache, direction, root="blocks.3.hook_resid_mid"),
        "contrastive": dpa_lens.dpa_edges(model, cache, PAIR, corrupted_cache=corrupted),
        "depass_heads": dpa_lens.depass(model, cache, PAIR, level="heads", progress=False),
        "depass_neurons": dpa_lens.depass(model, cache, PAIR, level="neurons", start_layer=2, by_position=True, progress=False),
    }
    with torch.no_grad():
        _, checkpointed = model.run_with_cache(tokens, names_filter=dpa_lens.dpa_names_filter(model, checkpoint=True))
    out["checkpoint"] = dpa_lens.dpa(model, checkpointed, PAIR)
    prompts = [IOI_PROMPT, "When Tom and Anna went to the park, Tom gave a ball to"]
    padded, mask = prepare_tokens(model, prompts)
    with torch.no_grad():
        _, batch = model.run_with_cache(padded, attention_mask=mask)
    out["padded"] = dpa_lens.dpa(model, batch, PAIR, attention_mask=mask)
    out["padded_dla"] = dpa_lens.dla(model, batch, PAIR, attention_mask=mask)
    paths = dpa_lens.dpa_paths(model, cache, PAIR, k=8, max_depth=2)
    out["paths"] = torch.tensor([p.score for p in paths[0]])
    circuit = dpa_lens.dpa_edges(model, cache, PAIR)
    out["faithfulness"] = dpa_lens.circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, circuit, fractions=[0.05, 0.2, 1.0],
                                                        progress=False).values
    return out


def _same_options(got: dict, want: dict, **tol) -> None:
    for key in want:
        if isinstance(want[key], torch.Tensor):
            torch.testing.assert_close(got[key].cpu(), want[key].cpu(), msg=key, **(tol or TOL))
        else:
            _same(got[key], want[key], **tol)


# ---------------------------------------------------------------------------------------------- splitting a model
_ROUTES: dict[int, tuple[torch.device, ...]] = {}  # id(cfg) of a split HookedTransformer -> its layers' devices
_BUILT: dict[tuple[str, str, str], tuple] = {}  # (line, family, split) -> (split model, whole model, home device)


def _split_hooked(model, devices: tuple[torch.device, ...]) -> None:
    """Layer ``l`` of a HookedTransformer on ``devices[l]``, the embeddings with the first layer and the final
    norm and unembedding with the last (TransformerLens's placement for ``n_devices``). Its forward moves the
    residual stream to ``get_device_for_block_index(i, cfg)`` before block ``i``: `_route` makes that the split's
    device (TransformerLens maps block indices to CUDA devices only)."""
    first, last = devices[0], devices[-1]
    for name in ("embed", "hook_embed", "pos_embed", "hook_pos_embed"):
        if hasattr(model, name):
            getattr(model, name).to(first)
    for block, device in zip(model.blocks, devices):
        block.to(device)
    for name in ("ln_final", "unembed"):
        if hasattr(model, name):
            getattr(model, name).to(last)
    model.cfg.n_devices = len(set(devices))
    model.cfg.device = str(first)
    _ROUTES[id(model.cfg)] = devices


def _route(monkeypatch) -> None:
    """TransformerLens's block-to-device map, answering a split model's devices for its blocks."""
    module = sys.modules[tl.hooked_transformer_class().__module__]
    original = module.get_device_for_block_index

    def route(index: int, cfg, device=None) -> torch.device:
        return _ROUTES[id(cfg)][index] if id(cfg) in _ROUTES else original(index, cfg, device)

    monkeypatch.setattr(module, "get_device_for_block_index", route)


def _split_bridge(model, devices: tuple[torch.device, ...]) -> None:
    """Layer ``l`` of a (Llama) bridge on ``devices[l]``: its ``transformers`` model dispatched by accelerate with a
    device map, block by block (each block's inputs moved to its device), as ``from_pretrained(device_map=...)`` does."""
    accelerate = pytest.importorskip("accelerate")
    place = lambda d: (d.index or 0) if d.type == "cuda" else "cpu"  # noqa: E731  accelerate's names
    first, last = place(devices[0]), place(devices[-1])
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": last, "lm_head": last,
                  **{f"model.layers.{l}": place(d) for l, d in enumerate(devices)}}
    accelerate.dispatch_model(model.original_model, device_map=device_map)
    model.cfg.n_devices = len(set(devices))
    model.cfg.device = str(devices[0])


SETUPS = [("hooked", "llama"), ("hooked", "gpt2"), ("bridge", "llama")]


@pytest.fixture(params=[(line, family, split) for line, family in SETUPS for split in SPLITS], ids=lambda p: "-".join(p))
def split_pair(request, monkeypatch):
    """(the model split across the CPU and cuda:0, the same model on one device, the split's embedding device)."""
    line, family, split = request.param
    if not CUDA:
        pytest.skip("splitting a model between the CPU and cuda:0 needs a CUDA device")
    if line not in LINES:
        pytest.skip(f"TransformerLens {tl.TL_VERSION} has no {line} line")
    if line == "hooked":
        _route(monkeypatch)
    if request.param not in _BUILT:  # built once per setup
        devices = tuple(torch.device(d) for d in SPLITS[split])
        whole, _ = make_tiny(family, line=line, seed=5, n_layers=N_LAYERS)
        split_model, _ = make_tiny(family, line=line, seed=5, n_layers=N_LAYERS)
        (_split_hooked if line == "hooked" else _split_bridge)(split_model, devices)
        view = ModelView(split_model)
        assert view.split and tuple(view.layer_device(l) for l in range(N_LAYERS)) == devices
        _BUILT[request.param] = (split_model, whole, devices[0])
    return _BUILT[request.param]


# ---------------------------------------------------------------------------------------------- with CUDA
@needs_cuda
@pytest.mark.parametrize("name", dpa_lens.available_methods())
def test_every_method_on_a_split_model_equals_the_whole_model(name, split_pair):
    split_model, whole, home = split_pair
    got, want = _run(name, split_model), _run(name, whole)
    _same(got, want)
    if name != "edge_random":  # runs no model, reads no cache: its scores are drawn on the CPU
        _on(got, home)


@needs_cuda
def test_dpa_options_on_a_split_model_equal_the_whole_model(split_pair):
    split_model, whole, home = split_pair
    got, want = _dpa_options(split_model), _dpa_options(whole)
    _same_options(got, want)
    for result in got.values():
        if isinstance(result, (Attribution, Circuit)):
            _on(result, home)


@needs_cuda
def test_a_split_model_keeps_its_weights_where_they_are(split_pair):
    """DPA, its edges and DePass read the weights where they are: none is copied to another device."""
    split_model, _, _ = split_pair
    before = {n: (p.device, p.data_ptr()) for n, p in split_model.named_parameters()}
    copied = []
    real_to = torch.Tensor.to
    weights = {p.data_ptr(): (n, p.device) for n, p in split_model.named_parameters()}

    def spy(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.data_ptr() in weights and out.device != self.device:
            copied.append((weights[self.data_ptr()][0], out.device))
        return out

    _, cache = split_model.run_with_cache(split_model.to_tokens(IOI_PROMPT))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", spy)
        dpa_lens.dpa(split_model, cache, PAIR)
        dpa_lens.dpa_edges(split_model, cache, PAIR, neurons=True)
        dpa_lens.dla(split_model, cache, PAIR)
    assert not copied, f"weights moved to another device: {copied[:5]}"
    assert before == {n: (p.device, p.data_ptr()) for n, p in split_model.named_parameters()}


# ---------------------------------------------------------------------------------------------- on the CPU
@pytest.mark.parametrize("line", LINES)
def test_layer_device_is_where_each_blocks_weights_are(line):
    model, _ = make_tiny("llama", line=line, n_layers=3)
    view = ModelView(model)
    assert [view.layer_device(l) for l in range(3)] == [CPU] * 3
    assert view.embed_device == CPU and view.unembed_device == CPU and not view.split
    model.blocks[1].to("meta")  # a device of its own, without data: where the view must say layer 1 is
    view = ModelView(model)
    assert [view.layer_device(l).type for l in range(3)] == ["cpu", "meta", "cpu"]
    assert view.split
    model.unembed.to("meta")
    assert ModelView(model).unembed_device.type == "meta" and ModelView(model).embed_device == CPU


@pytest.fixture(params=LINES)
def tiny(request):
    model, _ = make_tiny("llama", line=request.param, seed=7)
    return model


@pytest.fixture
def forced_split(monkeypatch):
    """Every model taken for split across devices (all of them the CPU): the split code path on one device."""

    def force():
        monkeypatch.setattr(ModelView, "split", property(lambda self: True))

    return force


def test_a_forced_split_reads_each_layer_on_its_device(tiny, forced_split):
    _, cache = tiny.run_with_cache(IOI_PROMPT)
    plain = read_forward(tiny, cache, PAIR, method="test", hook_names=required_hooks(ModelView(tiny), False), filter_hint="")
    assert plain.layer_devices is None
    forced_split()
    fwd = read_forward(tiny, cache, PAIR, method="test", hook_names=required_hooks(ModelView(tiny), False), filter_hint="")
    assert fwd.layer_devices == (CPU,) * tiny.cfg.n_layers
    assert fwd.device_for("blocks.1.attn.hook_v") == CPU and fwd.device_for("hook_embed") == CPU


@pytest.mark.parametrize("name", dpa_lens.available_methods())
def test_the_split_code_path_gives_the_plain_numbers(name, tiny, forced_split):
    """On one device the split path (each layer on `layer_device`, results gathered on the embedding's device)
    must compute exactly what the plain path does."""
    want = _run(name, tiny)
    forced_split()
    _same(_run(name, tiny), want, rtol=0, atol=1e-6)


def test_the_split_code_path_gives_the_plain_numbers_for_dpa_options(tiny, forced_split):
    tiny_deep, _ = make_tiny("llama", line="bridge" if tl.is_bridge(tiny) else "hooked", seed=7, n_layers=N_LAYERS)
    want = _dpa_options(tiny_deep)
    forced_split()
    _same_options(_dpa_options(tiny_deep), want, rtol=0, atol=1e-6)


def test_the_sweep_asks_each_layers_device_before_its_steps(tiny, forced_split, monkeypatch):
    """DPA's sweep runs layer ``l``'s steps after asking ``layer_device(l)``, and every activation a step reads
    is asked for on the device of the hook's layer."""
    forced_split()
    events: list[tuple[str, int]] = []
    reads: list[tuple[str, torch.device]] = []
    asked, mlp, attention, act = CachedForward.layer_device, Propagator.mlp, Propagator.attention, CachedForward.act

    def spy_device(self, layer):
        events.append(("device", layer))
        return asked(self, layer)

    def spy_act(self, name):
        out = act(self, name)
        reads.append((name, out.device))
        return out

    monkeypatch.setattr(CachedForward, "layer_device", spy_device)
    monkeypatch.setattr(CachedForward, "act", spy_act)
    monkeypatch.setattr(Propagator, "mlp", lambda self, layer, t: events.append(("mlp", layer)) or mlp(self, layer, t))
    monkeypatch.setattr(Propagator, "attention", lambda self, layer, t, **kw: events.append(("attention", layer)) or attention(self, layer, t, **kw))
    _, cache = tiny.run_with_cache(IOI_PROMPT)
    dpa_lens.dpa(tiny, cache, PAIR)
    L = tiny.cfg.n_layers
    for layer in range(L):
        steps = [i for i, e in enumerate(events) if e in (("mlp", layer), ("attention", layer))]
        assert steps, f"no step of layer {layer}"
        assert any(events[i] == ("device", layer) for i in range(steps[0])), f"layer {layer} ran before its device was asked"
    assert {e[1] for e in events if e[0] == "device"} == set(range(L))
    assert reads and all(device == CPU for _, device in reads)
