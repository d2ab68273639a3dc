"""MIB's graph JSON for `Circuit`: the file format of MIB's circuit-localization track (Mueller et al. 2025).

MIB reads circuits with ``Graph.from_json`` of its reference implementation (``hannamw/EAP-IG``,
``src/eap/graph.py``), and writes them with ``Graph.to_json``. A file is one JSON object:

* ``"cfg"``: ``n_layers``, ``n_heads``, ``parallel_attn_mlp`` and ``d_model`` (what ``Graph.from_model`` builds the
  graph from; ``from_json`` builds it with ``neuron_level=True``, which reads ``d_model``);
* ``"nodes"``: ``{"input" | "a{layer}.h{head}" | "m{layer}" | "logits": {"in_graph": bool}}``, with ``"score"`` in
  node-level files and ``"neurons"`` / ``"neurons_scores"`` (``d_model`` entries) in neuron-level ones;
* ``"edges"``: ``{"{parent}->{child}": {"score": float, "in_graph": bool}}``, where an edge into a head names the
  head's input, ``"a0.h1->a2.h3<q>"``, ``"input->a1.h0<v>"``, and edges into an MLP or the logits carry none,
  ``"input->m0"``, ``"m1->logits"``.

The reference's graph is dpa_lens's (`dpa_lens.graph.Graph`) under other names: ``input`` is ``embed``,
``a{l}.h{h}`` is ``L{l}H{h}``, ``m{l}`` is ``L{l}.mlp`` and ``logits`` the reader ``(logit, logit)``; an edge into a
head's ``<q>``, ``<k>`` or ``<v>`` is the reader ``(L{l}H{h}, q|k|v)``. Every layer has its heads and an MLP (an
attention-only model has no MLP nodes, so it has no MIB graph); grouped key/value heads are split by query
head (MIB runs TransformerLens with ``ungroup_grouped_query_attention``), as in dpa_lens. A head reads every
node of earlier layers; an MLP also its own layer's heads unless the block is parallel (``parallel_attn_mlp``);
the logits read every node. An edge's ``in_graph`` says whether the circuit keeps it; a node is in the graph
when it has a kept edge out and (unless it is ``input``) a kept edge in, the rule of the reference's
``apply_topn`` and ``prune``; ``logits`` always is. MIB's evaluation prunes again before it runs a circuit
(``evaluate_graph`` calls ``Graph.prune``): a kept edge whose writer has no kept edge in is dropped there.

`write_mib_json` / `Circuit.to_mib_json` write a circuit's scores (one row) in this format; `read_mib_json` /
`Circuit.from_mib_json` read such a file, written here, by MIB or by the reference, into a `Circuit` on that
file's graph. Both are pure: no model is needed. MIB's neuron-level files, node scores as a circuit
(node-level importances are read into ``nodes`` but never written) and MLP neurons as writers have no place
in the other format and are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path as FilePath
from typing import Any, Literal

import torch
from jaxtyping import Bool
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.files import write_text_atomic
from dpa_lens.graph import Graph
from dpa_lens.results.circuit import Circuit

CFG_KEYS: tuple[str, ...] = ("n_layers", "n_heads", "parallel_attn_mlp", "d_model")
"""The keys of ``cfg`` that the reference's ``Graph.from_json`` reads (``Graph.from_model``)."""

_HEAD = re.compile(r"a(0|[1-9][0-9]*)\.h(0|[1-9][0-9]*)")
_MLP = re.compile(r"m(0|[1-9][0-9]*)")
_CHILD = re.compile(r"(?P<node>[^<>]+)(?:<(?P<qkv>[^<>]*)>)?")


# ---------------------------------------------------------------------------------------------- names
def mib_node_name(writer: str) -> str:
    """MIB's name of a dpa_lens writer: ``embed`` → ``input``, ``L{l}H{h}`` → ``a{l}.h{h}``, ``L{l}.mlp`` → ``m{l}``."""
    if writer == "embed":
        return "input"
    head = re.fullmatch(r"L(\d+)H(\d+)", writer)
    if head:
        return f"a{head[1]}.h{head[2]}"
    mlp = re.fullmatch(r"L(\d+)\.mlp", writer)
    if mlp:
        return f"m{mlp[1]}"
    raise InputError(f"writer {writer!r} has no MIB name: MIB's nodes are the embeddings, heads and MLPs (no MLP neurons)")


def mib_child_name(reader: tuple[str, str]) -> str:
    """The child part of MIB's edge name for a dpa_lens reader: ``(L{l}H{h}, q)`` → ``a{l}.h{h}<q>``,
    ``(L{l}.mlp, mlp)`` → ``m{l}``, ``(logit, logit)`` → ``logits``."""
    node, path = reader
    if path == "logit":
        return "logits"
    if path == "mlp":
        return mib_node_name(node)
    return f"{mib_node_name(node)}<{path}>"


def edge_order(graph: Graph) -> list[tuple[int, int]]:
    """Every edge of a MIB graph as ``(writer, reader)`` indices of ``graph``, in the order in which the
    reference's ``Graph.from_model`` adds them (and ``to_json`` writes them): layer by layer, each node of the
    stream so far into the layer's heads (head by head, ``q, k, v``) and into its MLP (node by node, heads then
    MLP, in a parallel block; after the layer's heads are added to the stream otherwise), then every node into
    the logits."""
    if not graph.has_mlp or graph.neuron_layers:
        raise InputError("a MIB graph has an MLP in every layer and no neuron writers")
    order: list[tuple[int, int]] = []
    for layer in range(graph.n_layers):
        heads, mlp = range(graph.head_readers(layer).start, graph.head_readers(layer).stop), graph.mlp_reader(layer)
        for w in range(graph.read_by_heads(layer)):
            order += [(w, r) for r in heads]
            if graph.parallel:
                order.append((w, mlp))
        if not graph.parallel:
            order += [(w, mlp) for w in range(graph.read_by_mlp(layer))]
    return order + [(w, graph.logit_reader) for w in range(graph.n_units)]


def _node_readers(graph: Graph) -> list[list[int]]:
    """Per writer (neurons aside), the readers of its own node: a head's ``q, k, v``, an MLP's input; none for ``embed``."""
    readers: list[list[int]] = [[]]
    for layer in range(graph.n_layers):
        r0 = graph.head_readers(layer).start
        readers += [[r0 + 3 * h + i for i in range(3)] for h in range(graph.n_heads)]
        readers.append([graph.mlp_reader(layer)])
    return readers


def nodes_in_graph(graph: Graph, kept: Bool[Tensor, "writer reader"]) -> Bool[Tensor, " writer"]:
    """Which writers are nodes of the circuit ``kept [writer, reader]`` by the reference's rule: a kept edge out,
    and a kept edge into one of its node's readers unless it is ``input`` (``[writer]``; the logits always are)."""
    kept = kept.cpu()
    out = kept[: graph.n_units].any(1)
    into = kept.any(0)
    inside = torch.tensor([i == 0 or bool(into[rs].any()) for i, rs in enumerate(_node_readers(graph))])
    return out & inside


# ---------------------------------------------------------------------------------------------- writing
def _graph_of(circuit: Circuit, cfg: Mapping[str, Any]) -> tuple[Graph, dict[str, Any]]:
    """The MIB graph a circuit lives on and the ``cfg`` to write: derived from its writers and edges, then ``cfg``."""
    if "root" in circuit.settings:
        raise InputError("a rerooted circuit explains its root, not the model's output: MIB's graph ends at the logits; "
                         "compute the circuit without root=")
    neurons = [w for w in circuit.writers if re.fullmatch(r"L\d+N\d+", w)]
    if neurons:
        raise InputError(f"the circuit has {len(neurons)} MLP-neuron writers ({neurons[0]!r}, ...): MIB's graph has none (its "
                         "'neurons' are d_model dimensions of a node's output); compute the circuit without neurons=")
    n_layers = sum(1 for w in circuit.writers if w.endswith(".mlp"))
    if n_layers == 0:
        raise InputError("the circuit is of an attention-only model (no MLP writers): MIB's graph has an MLP in every layer, "
                         "so such a model has no MIB graph")
    n_heads = sum(1 for w in circuit.writers if w.startswith("L0H"))
    base = dict(circuit.settings.get("mib_cfg") or {})  # a circuit read from a MIB file knows its cfg
    given = {**base, **cfg}
    for key, value in (("n_layers", n_layers), ("n_heads", n_heads)):
        if key in cfg and (isinstance(cfg[key], bool) or cfg[key] != value):
            raise InputError(f"cfg[{key!r}] = {cfg[key]!r}, but the circuit's graph has {key} = {value}")
    seq, par = Graph(n_layers, n_heads, False), Graph(n_layers, n_heads, True)
    if circuit.writers != seq.writers or circuit.readers != seq.readers:
        raise InputError(f"the circuit's writers and readers are not those of a graph of {n_layers} layers of {n_heads} heads "
                         "and an MLP: it is no graph of dpa_lens.graph")
    in_graph = circuit.in_graph.cpu()
    if bool((in_graph & ~seq.mask).any()):
        raise InputError("the circuit holds edges that exist in no graph (a reader reading a writer downstream of it)")
    sequential_only = bool((in_graph & ~par.mask).any())  # a head into its own layer's MLP
    if "parallel_attn_mlp" in given:
        parallel = given["parallel_attn_mlp"]
        if not isinstance(parallel, bool):
            raise InputError(f"cfg['parallel_attn_mlp'] must be True or False, got {parallel!r}")
        if parallel and sequential_only:
            raise InputError("cfg['parallel_attn_mlp'] is True, but the circuit holds edges from heads into their own layer's MLP, "
                             "which a parallel block does not have")
    elif sequential_only:
        parallel = False
    elif torch.equal(in_graph, par.mask) and "pruned_from" not in circuit.settings:
        parallel = True  # every edge of a parallel graph, and none that only a sequential one has
    else:
        raise InputError("cannot tell from this circuit whether the model's attention and MLP are parallel (it holds no edge "
                         "from a head into its own layer's MLP): pass cfg={'parallel_attn_mlp': True or False, ...}")
    if "d_model" not in given:
        raise InputError("cfg is missing 'd_model' (the model's residual width, model.cfg.d_model), which MIB's Graph.from_json "
                         "reads and a circuit does not hold: pass cfg={'d_model': ...}")
    d_model = given["d_model"]
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise InputError(f"cfg['d_model'] must be a positive int, got {d_model!r}")
    out = {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": parallel, "d_model": d_model}
    out.update({k: v for k, v in given.items() if k not in out})
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"cfg must hold JSON values (numbers, strings, booleans, lists, dicts): {err}") from None
    return (par if parallel else seq), out


def _kept(circuit: Circuit, graph: Graph, keep: Any, scores: Tensor, absolute: bool = True) -> Bool[Tensor, "writer reader"]:
    """The edges to mark ``in_graph`` (see `write_mib_json`)."""
    held = circuit.in_graph.cpu() & graph.mask
    if not isinstance(absolute, bool):
        raise InputError(f"absolute must be True (rank by |score|) or False (by the signed score), got {absolute!r}")
    if keep is None:
        return held
    if isinstance(keep, Tensor):
        if keep.dtype != torch.bool or tuple(keep.shape) != tuple(held.shape):
            raise InputError(f"keep as a tensor must be a bool mask [writer, reader] of shape {tuple(held.shape)}, "
                             f"got {keep.dtype} {tuple(keep.shape)}")
        keep = keep.cpu()
        outside = int((keep & ~held).sum())
        if outside:
            raise InputError(f"keep marks {outside} edges that the circuit does not hold (not in its in_graph, or not in the graph)")
        return keep.clone()
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise InputError(f"keep must be None (the circuit's edges), an int (the top n by |score|) or a bool mask [writer, reader], "
                         f"got {type(keep).__name__}")
    n_held = int(held.sum())
    if not 0 <= keep <= n_held:
        raise InputError(f"keep={keep} edges: the circuit holds {n_held}; pass 0 ≤ keep ≤ {n_held}")
    index = torch.nonzero(held.flatten()).flatten()
    ranked = scores.float().abs() if absolute else scores.float()
    order = index[torch.argsort(-ranked.flatten()[index], stable=True)]  # as circuit_faithfulness ranks
    kept = torch.zeros_like(held)
    kept.view(-1)[order[:keep]] = True
    return kept


def to_mib_dict(circuit: Circuit, *, keep: int | Tensor | None = None, row: int = 0,
                cfg: Mapping[str, Any] | None = None, absolute: bool = True) -> dict[str, Any]:
    """The MIB graph JSON of one row of ``circuit``, as a dict (``{"cfg", "nodes", "edges"}``; see `write_mib_json`)."""
    if not isinstance(circuit, Circuit):
        raise InputError(f"expected a dpa_lens Circuit, got {type(circuit).__name__}")
    if cfg is not None and not isinstance(cfg, Mapping):
        raise InputError(f"cfg must be a dict of MIB cfg values such as {{'d_model': 768}}, got {type(cfg).__name__}")
    graph, out_cfg = _graph_of(circuit, cfg or {})
    scores = circuit.scores[circuit.row_index(row)].detach().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise InputError("the circuit has NaN or infinite edge scores: MIB's files hold numbers (JSON has no NaN)")
    kept = _kept(circuit, graph, keep, scores, absolute)
    values, flags = scores.double().tolist(), kept.tolist()
    w_names = [mib_node_name(w) for w in graph.writers]
    r_names = [mib_child_name(r) for r in graph.readers]
    node_flags = nodes_in_graph(graph, kept).tolist()
    nodes = {name: {"in_graph": bool(flag)} for name, flag in zip(w_names, node_flags)}
    nodes["logits"] = {"in_graph": True}
    edges = {f"{w_names[w]}->{r_names[r]}": {"score": values[w][r], "in_graph": bool(flags[w][r])} for w, r in edge_order(graph)}
    return {"cfg": out_cfg, "nodes": nodes, "edges": edges}


def write_mib_json(circuit: Circuit, path: str | os.PathLike, *, keep: int | Tensor | None = None, row: int = 0,
                   cfg: Mapping[str, Any] | None = None, absolute: bool = True) -> FilePath:
    """Write one row of a circuit as MIB's graph JSON (what the reference's ``Graph.from_json`` and MIB read).

    Args:
        circuit: edge scores ``scores [batch, writer, reader]`` on a model's graph (`dpa_lens.graph`), without
            neuron writers or a ``root``, of a model with an MLP in every layer.
        path: the file to write (through `dpa_lens.files.write_atomic`: the whole file or nothing).
        keep: the edges marked ``in_graph`` (the circuit MIB evaluates when it is given circuits rather than
            scores): None, every edge the circuit holds (its ``in_graph``: the edges scored); an int ``n``, the
            ``n`` held edges of largest ``|score|`` (ties in graph order, as `dpa_lens.evaluation.circuit_faithfulness`
            ranks; ``absolute=False``: of largest signed score, as MIB ranks for CPR); or a bool mask
            ``[writer, reader]`` inside ``circuit.in_graph``.
        row: the batch row written (MIB's files hold one set of scores: pass ``circuit.mean()`` for a dataset).
        cfg: values of MIB's ``cfg`` that a circuit cannot know, above all ``d_model`` (the residual width; required
            unless the circuit was read from a MIB file); ``parallel_attn_mlp`` where the circuit's edges do not tell
            (they do when it holds a head's edge into its own layer's MLP, or every edge of a parallel graph);
            other keys are written as given. ``n_layers`` and ``n_heads`` come from the circuit.

    Every edge of the reference's graph is written, in its order, with the score the circuit holds (0 for an
    edge outside its ``in_graph``, by `Circuit`'s convention); nodes are in the graph by the reference's rule (see
    the module docstring). Scores keep dpa_lens's sign: positive where the edge moves the explained quantity
    toward its clean value (`dpa_lens.edge_atp`, `dpa_lens.eap_ig`: ``(clean − corrupted writer output) ·
    gradient``). The reference's ``attribute`` scores ``(corrupted − clean) · gradient`` of its metric, which
    MIB's ``run_attribution.py`` gives negated (``loss=True``: minus the logit difference), so MIB's own score
    files carry this sign too when the explained quantity is MIB's logit difference; a file made with the
    metric as is carries the opposite sign. MIB's CMD ranks edges by ``|score|`` (``--absolute``), which ignores
    the sign; its CPR ranks by the signed score, highest first, which does not. Per-position scores and node
    scores are not written.

    Returns:
        The path written.
    """
    data = to_mib_dict(circuit, keep=keep, row=row, cfg=cfg, absolute=absolute)
    return write_text_atomic(path, json.dumps(data, allow_nan=False), what="the MIB graph JSON")


# ---------------------------------------------------------------------------------------------- reading
def _cfg_from(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    cfg = data["cfg"]
    if not isinstance(cfg, Mapping):
        raise InputError(f"{where}: 'cfg' must be an object with {', '.join(CFG_KEYS)}, got {type(cfg).__name__}")
    missing = [k for k in CFG_KEYS if k not in cfg]
    if missing:
        raise InputError(f"{where}: cfg is missing {', '.join(repr(k) for k in missing)} (MIB's Graph.from_json reads {', '.join(CFG_KEYS)})")
    for key in ("n_layers", "n_heads", "d_model"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise InputError(f"{where}: cfg[{key!r}] must be a positive int, got {cfg[key]!r}")
    if not isinstance(cfg["parallel_attn_mlp"], bool):
        raise InputError(f"{where}: cfg['parallel_attn_mlp'] must be true or false, got {cfg['parallel_attn_mlp']!r}")
    return dict(cfg)


def _flag(value: Any, what: str, where: str) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise InputError(f"{where}: {what} must be true or false, got {value!r}")


def _node_index(name: str, cfg: Mapping[str, Any], w_index: Mapping[str, int], where: str) -> int | None:
    """The writer index of a MIB node name (None for ``logits``), or `InputError` naming it."""
    if name == "logits":
        return None
    if name in w_index:
        return w_index[name]
    shape = f"{cfg['n_layers']} layers of {cfg['n_heads']} heads"
    if name == "input" or _HEAD.fullmatch(name) or _MLP.fullmatch(name):
        raise InputError(f"{where}: node {name!r} is not in a graph of {shape} (cfg)")
    raise InputError(f"{where}: unknown node {name!r}: MIB's nodes are 'input', 'a{{layer}}.h{{head}}', 'm{{layer}}' and 'logits'")


def from_mib_dict(data: Any, *, edges: Literal["all", "kept"] = "all", method: str = "mib", source: str = "") -> Circuit:
    """A `Circuit` from a parsed MIB graph JSON (see `read_mib_json`; ``source`` names the file in messages)."""
    where = source or "the MIB graph"
    if edges not in ("all", "kept"):
        raise InputError(f"edges must be 'all' (every edge of the file, with its score) or 'kept' (the edges marked in_graph), got {edges!r}")
    if not isinstance(data, Mapping):
        raise InputError(f"{where} is not a MIB graph: expected a JSON object with 'cfg', 'nodes' and 'edges', got {type(data).__name__}")
    missing = [k for k in ("cfg", "nodes", "edges") if k not in data]
    if missing:
        raise InputError(f"{where} is not a MIB graph: it lacks {', '.join(repr(k) for k in missing)} (a MIB graph JSON has 'cfg', 'nodes', 'edges')")
    cfg = _cfg_from(data, where)
    graph = Graph(cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"])
    w_index = {mib_node_name(w): i for i, w in enumerate(graph.writers)}
    r_index = {mib_child_name(r): i for i, r in enumerate(graph.readers)}
    if not isinstance(data["nodes"], Mapping) or not isinstance(data["edges"], Mapping):
        raise InputError(f"{where}: 'nodes' and 'edges' must be JSON objects keyed by name")

    node_scores = torch.full((1, len(graph.writers)), float("nan"), dtype=torch.float64)
    any_node_score = False
    for name, info in data["nodes"].items():
        w = _node_index(name, cfg, w_index, where)
        if not isinstance(info, Mapping):
            raise InputError(f"{where}: node {name!r} must be an object {{'in_graph': ...}}, got {info!r}")
        if w is None:
            continue  # the reference skips the logits (always in the graph)
        if "in_graph" not in info:
            raise InputError(f"{where}: node {name!r} has no 'in_graph'")
        _flag(info["in_graph"], f"node {name!r}'s in_graph", where)
        if "neurons" in info or "neurons_scores" in info:
            raise InputError(f"{where}: node {name!r} has neurons: a neuron-level MIB circuit (d_model dimensions of each node) "
                             "has no dpa_lens Circuit, which holds edges")
        if "score" in info:
            value = info["score"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{where}: node {name!r}'s score must be a number, got {value!r}")
            node_scores[0, w] = float(value)  # NaN: not scored, as in the reference
            any_node_score = True

    exists = graph.mask.tolist()
    ws, rs, values, flags = [], [], [], []
    for name, info in data["edges"].items():
        parent, arrow, child = name.partition("->")
        match = _CHILD.fullmatch(child) if arrow else None
        if match is None:
            raise InputError(f"{where}: edge {name!r} is not named 'parent->child' (e.g. 'a0.h1->a2.h3<q>', 'input->m0', 'm1->logits')")
        w = _node_index(parent, cfg, w_index, where)
        if w is None:
            raise InputError(f"{where}: edge {name!r} cannot exist: the logits write to no node")
        node, qkv = match["node"], match["qkv"]
        if node == "input":
            raise InputError(f"{where}: edge {name!r} cannot exist: the input reads no node")
        _node_index(node, cfg, w_index, where)
        if _HEAD.fullmatch(node) and qkv not in ("q", "k", "v"):
            raise InputError(f"{where}: edge {name!r} into a head must name its input, <q>, <k> or <v>")
        if not _HEAD.fullmatch(node) and qkv is not None:
            raise InputError(f"{where}: edge {name!r}: only edges into heads carry <q>, <k> or <v>")
        r = r_index[child]
        if not exists[w][r]:
            kind = "parallel" if cfg["parallel_attn_mlp"] else "sequential"
            raise InputError(f"{where}: edge {name!r} cannot exist in this graph ({kind} blocks): {node} does not read {parent}")
        if not isinstance(info, Mapping) or "score" not in info or "in_graph" not in info:
            raise InputError(f"{where}: edge {name!r} must be an object with 'score' and 'in_graph', got {info!r}")
        value = info["score"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{where}: edge {name!r}'s score must be a finite number, got {value!r}")
        ws.append(w)
        rs.append(r)
        values.append(float(value))
        flags.append(_flag(info["in_graph"], f"edge {name!r}'s in_graph", where))

    scores = torch.zeros(1, len(graph.writers), len(graph.readers), dtype=torch.float64)
    present = torch.zeros(len(graph.writers), len(graph.readers), dtype=torch.bool)
    kept = torch.zeros_like(present)
    index = (torch.tensor(ws, dtype=torch.long), torch.tensor(rs, dtype=torch.long))
    scores[0][index] = torch.tensor(values, dtype=torch.float64)
    present[index] = True
    kept[index] = torch.tensor(flags, dtype=torch.bool)

    settings: dict[str, Any] = {"mib_cfg": cfg}
    if source:
        settings["source"] = source
    in_graph = present
    if edges == "kept":
        in_graph, scores = kept, scores * kept
        settings["pruned_from"] = int(present.sum())
    return Circuit(method=method, writers=graph.writers, readers=graph.readers, scores=scores, in_graph=in_graph,
                   nodes=node_scores if any_node_score else None, settings=settings)


def read_mib_json(path: str | os.PathLike, *, edges: Literal["all", "kept"] = "all", method: str = "mib") -> Circuit:
    """A `Circuit` from a MIB graph JSON file (written by `write_mib_json`, by MIB or by ``hannamw/EAP-IG``).

    Args:
        path: the file.
        edges: ``"all"`` (default): ``in_graph`` is the edges the file lists (every edge of its graph, in a file
            the reference wrote) and ``scores [1, writer, reader]`` their scores, as float64 (lossless for any
            JSON number); ``"kept"``: ``in_graph`` is the edges the file marks ``in_graph`` (its circuit), scores
            0 elsewhere, as `Circuit.prune` leaves them (``settings["pruned_from"]``: how many edges the file lists).
        method: the circuit's ``method`` (default ``"mib"``).

    Returns:
        A `Circuit` of one row on the graph of the file's ``cfg`` (``settings["mib_cfg"]``, which `write_mib_json`
        reuses; ``settings["source"]``: the path), with no target or tokens. Node scores of a node-level file are
        ``nodes [1, writer]`` (NaN where a node has none: the reference's "not scored"). Node ``in_graph`` flags
        are checked but not kept (the reference derives them from the edges).

    Raises:
        InputError: a file that is not a MIB graph: not JSON, a missing key (``cfg``, ``nodes``, ``edges``, a cfg key),
            an unknown node name or one outside the cfg's graph, an edge that cannot exist in that graph, a
            score that is not a finite number, a neuron-level file. FileNotFoundError: no such file.
    """
    path = FilePath(path).expanduser()
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not a MIB graph JSON: it is not JSON ({err})") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder: pass a MIB graph JSON file") from None
    return from_mib_dict(data, edges=edges, method=method, source=str(path))


__all__ = ["CFG_KEYS", "edge_order", "from_mib_dict", "mib_child_name", "mib_node_name", "nodes_in_graph", "read_mib_json",
           "to_mib_dict", "write_mib_json"]
