"""Checkpoints: atomic save, integrity-checked load, keep-last-N pruning, exact resume.

Layout: <base>/checkpoints/<stage>/<tag>/step_<06d>/
    model.pt            rank 0: the model state_dict
    optim_rank<r>.pt    rank r: its optimizer state_dicts, each holding only rank r's shard under
                        torchrun (nanochat.optim: sharded ZeRO-2 style); a run with another
                        process count merges every rank's file and re-shards (load_checkpoint)
    meta.json           rank 0, written last: the caller's meta plus "step", "files" (name -> size),
                        "world_size" and "rank_state" (per rank: data-loader and RNG state)

A step directory counts as complete once meta.json exists and every file it lists checks out.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanochat.common import autodetect_device
from nanochat.files import atomic_path, free_space, get_base_dir, write_text_atomic

# the stages that write checkpoints a later script can load, in pipeline order
CHECKPOINT_STAGES = ["base", "mid", "sft", "rl"]
META_NAME = "meta.json"
MODEL_NAME = "model.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_dir(stage: str, tag: str) -> Path:
    """<base>/checkpoints/<stage>/<tag> (not created here; save_checkpoint creates it)."""
    return get_base_dir() / "checkpoints" / stage / tag


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{int(step):06d}"


def optim_name(rank: int) -> str:
    return f"optim_rank{rank}.pt"


# ----------------------------------------------------------------------------------------------
# atomic file writing


def _atomic_torch_save(obj, path: Path) -> dict:
    # a temp name, fsync, then rename: a crash leaves the old file or the new one, never half of one
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            # torch's zip writer reports a short write as "unexpected pos ...", not as the OSError
            # underneath: with the filesystem all but full, that was ENOSPC
            written = tmp.stat().st_size if tmp.exists() else 0
            if shutil.disk_usage(tmp.parent).free < max(written, 16 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
            raise
        size = tmp.stat().st_size
    return {"size": size}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota, a vanished mount). The step
    directory it was writing is removed (it never had meta.json, so nothing would have loaded it);
    the older checkpoints are untouched."""


def _write_failed(exc: OSError, path: Path, ckpt_dir: Path, step: int) -> CheckpointWriteError:
    previous = [
        (s, p) for s, p in _list_step_dirs(ckpt_dir) if s != step and _verify(p, deep=False)[0]
    ]
    need = ""
    if previous:
        size = sum(f.stat().st_size for f in previous[-1][1].iterdir() if f.is_file())
        need = f"; a checkpoint here takes about {size / 1e6:.1f} MB"
    kept = (
        f"The newest complete checkpoint, step {previous[-1][0]}, is intact: a resume loads it."
        if previous
        else "No earlier checkpoint exists: a resume starts over."
    )
    error = CheckpointWriteError(
        f"could not write checkpoint step {step}: {path}: {exc.strerror or exc} "
        f"({free_space(path)} on that filesystem{need}). {kept} Free some space (or keep fewer "
        f"checkpoints: --keep-last 1), then run the same command."
    )
    error.errno = exc.errno
    return error


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------------------------
# saving


def clean_state_dict(state: dict) -> dict:
    """Strip the wrappers' key prefixes: torch.compile adds `_orig_mod.`, DDP adds `module.`."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in ("_orig_mod.", "module."):
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        key = key.replace("._orig_mod.", ".")
        out[key] = value
    return out


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model_state: dict | None,
    optimizer_states: list | None,
    meta: dict,
    rank: int = 0,
    keep_last: int | None = 2,
    rank_state: dict | None = None,
) -> Path:
    """Write <ckpt_dir>/step_<step>/ atomically and return that directory.

    Call it on every rank when torch.distributed is initialised: it synchronises them. meta and
    rank_state must be JSON-serialisable; keep_last None or 0 keeps every checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    out_dir = step_dir(ckpt_dir, step)
    meta = dict(meta)
    meta["step"] = int(step)
    # rank 0 writes model.pt and meta.json, each rank its own optim_rank<r>.pt; each rank's
    # rank_state (data-loader and RNG state) is gathered into meta["rank_state"][r]
    try:  # fail before touching the disk if meta cannot be written
        json.dumps(meta)
        json.dumps(rank_state)
    except TypeError as e:
        raise TypeError(
            f"checkpoint meta/rank_state must be JSON-serialisable (step {step}): {e}"
        ) from e

    distributed = _dist_on()
    world_size = dist.get_world_size() if distributed else 1
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Re-saving a step (e.g. after a resume): mark it incomplete before overwriting anything.
        (out_dir / META_NAME).unlink(missing_ok=True)
        for stale in out_dir.glob("*.tmp*"):  # leftovers of a save that was killed midway
            stale.unlink(missing_ok=True)
    if distributed:
        dist.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)

    files: dict[str, dict] = {}
    writing = out_dir
    try:
        if optimizer_states is not None:
            writing = out_dir / optim_name(rank)
            files[optim_name(rank)] = _atomic_torch_save(list(optimizer_states), writing)
        if rank == 0 and model_state is not None:
            writing = out_dir / MODEL_NAME
            files[MODEL_NAME] = _atomic_torch_save(clean_state_dict(model_state), writing)
    except OSError as exc:  # a full disk: say so, and leave no half-written step behind
        shutil.rmtree(out_dir, ignore_errors=True)
        raise _write_failed(exc, writing, ckpt_dir, step) from None

    gathered = [(files, rank_state)]
    if distributed:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (files, rank_state))

    if rank == 0:
        all_files: dict[str, dict] = {}
        for rank_files, _ in gathered:
            all_files.update(rank_files)
        meta["files"] = dict(sorted(all_files.items()))
        meta["world_size"] = world_size
        if any(rs is not None for _, rs in gathered):
            meta["rank_state"] = [rs for _, rs in gathered]
        meta["saved_at"] = time.time()
        try:
            # last: its presence is what marks the step complete
            write_text_atomic(out_dir / META_NAME, json.dumps(meta, indent=1))
        except OSError as exc:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise _write_failed(exc, out_dir / META_NAME, ckpt_dir, step) from None
        if keep_last:
            _prune(ckpt_dir, keep_last, protect=int(step))
    if distributed:
        dist.barrier()  # on return the checkpoint is complete for everyone
    return out_dir


def _prune(ckpt_dir: Path, keep_last: int, protect: int) -> None:
    """Keep the newest `keep_last` complete steps (and `protect`); drop older ones and leftovers
    of crashed saves."""
    keep_last = max(1, int(keep_last))
    complete, broken = [], []
    for step, path in _list_step_dirs(ckpt_dir):
        ok, _ = _verify(path)  # deep: a same-size but garbled file must not count as a keeper
        (complete if ok else broken).append((step, path))
    keep = {s for s, _ in complete[-keep_last:]} | {protect}
    for step, path in complete[:-keep_last] + broken:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# finding and verifying


def _list_step_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _read_meta(path: Path) -> dict:
    with open(path / META_NAME, encoding="utf-8") as f:
        return json.load(f)


def read_meta(ckpt_dir: str | Path, step: int) -> dict:
    """meta.json of one step (what wrote it: world_size, step, the caller's meta)."""
    return _read_meta(step_dir(ckpt_dir, step))


def _verify(path: Path, deep: bool = True) -> tuple[bool, str]:
    """(ok, reason). Shallow: meta.json parses and the files it lists have their sizes.
    Deep: their zip directories open too."""
    if not (path / META_NAME).exists():
        return False, "no meta.json (save never finished)"
    try:
        meta = _read_meta(path)
    except (OSError, ValueError) as e:
        return False, f"unreadable meta.json ({e})"
    files = meta.get("files")
    if not isinstance(files, dict):
        return False, "meta.json lists no files"
    for name, info in files.items():
        f = path / name
        if not f.exists():
            return False, f"{name} is missing"
        size = f.stat().st_size
        if size != info.get("size"):
            return False, f"{name} has {size} bytes, meta.json says {info.get('size')} (truncated?)"
        if deep:
            # torch.save writes a zip archive whose directory sits at the very end, so a truncated
            # or overwritten tail fails here instead of at load time
            try:
                with zipfile.ZipFile(f) as zf:
                    zf.infolist()
            except (zipfile.BadZipFile, OSError) as e:
                return False, f"{name} is not a readable torch file ({e})"
    return True, ""


def find_last_step(ckpt_dir: str | Path) -> int | None:
    """Newest complete and readable step in ckpt_dir, or None; newer broken ones are skipped with a
    warning."""
    for step, path in reversed(_list_step_dirs(ckpt_dir)):
        ok, reason = _verify(path)
        if ok:
            return step
        warnings.warn(f"skipping checkpoint {path}: {reason}", stacklevel=2)
    return None


# ----------------------------------------------------------------------------------------------
# loading


def _load_step(path: Path, device, load_optimizer: bool, rank: int, world_size: int | None):
    meta = _read_meta(path)

    def load(name, device=device):
        # weights_only: checkpoints hold tensors and plain containers, nothing to unpickle as code
        return torch.load(path / name, map_location=device, weights_only=True)

    model_state = load(MODEL_NAME) if (path / MODEL_NAME).exists() else None
    optim_states = None
    saved_world = meta.get("world_size", 1)
    if load_optimizer and world_size is not None and world_size != saved_world:
        optim_states = _reshard_optimizer_states(path, saved_world, world_size, load)
    elif load_optimizer:
        name = optim_name(rank)
        if not (path / name).exists():
            raise FileNotFoundError(
                f"{path / name} is missing: this checkpoint was saved with "
                f"world_size={meta.get('world_size')}; "
                f"resume with the same number of processes or pass load_optimizer=False"
            )
        optim_states = load(name)
    return model_state, optim_states, meta


def _reshard_optimizer_states(path: Path, saved_world: int, world_size: int, load) -> list:
    """Every rank's optimizer file of a checkpoint written by `saved_world` processes, merged into
    single-process state_dicts, which a sharded optimizer of any world size slices its part from
    (its load_state_dict). Every rank reads every file, on the CPU: at d20, 8 GB of AdamW state."""
    from nanochat.optim import merge_optimizer_states  # the optimizers know their own layout

    names = [optim_name(r) for r in range(saved_world)]
    missing = [n for n in names if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} was written by {saved_world} process(es), this run has {world_size}: "
            f"re-sharding its optimizer state needs every rank's file, and "
            f"{', '.join(missing)} is missing"
        )
    parts = [load(n, device="cpu") for n in names]  # per rank: one state_dict per optimizer
    return [merge_optimizer_states(list(per_opt)) for per_opt in zip(*parts)]


def load_checkpoint(
    ckpt_dir: str | Path,
    step: int | None = None,
    device="cpu",
    load_optimizer: bool = False,
    rank: int = 0,
    world_size: int | None = None,
):
    """-> (model_state, optim_states | None, meta); meta["rank_state"][rank] is what `rank` saved.

    step None: the newest complete step, or (with a warning) an older one that loads.
    world_size: this run's process count; when the checkpoint was written by another, the
    optimizer states of all its ranks are merged into single-process ones (each sharded optimizer
    keeps its part when it loads them). None: load this rank's file, whatever wrote it."""
    ckpt_dir = Path(ckpt_dir)
    if step is not None:
        path = step_dir(ckpt_dir, step)
        ok, reason = _verify(path)
        if not ok:
            raise FileNotFoundError(f"checkpoint {path} is not usable: {reason}")
        return _load_step(path, device, load_optimizer, rank, world_size)
    for _, path in reversed(_list_step_dirs(ckpt_dir)):
        ok, reason = _verify(path)
        if not ok:
            warnings.warn(f"skipping checkpoint {path}: {reason}", stacklevel=2)
            continue
        try:
            return _load_step(path, device, load_optimizer, rank, world_size)
        except FileNotFoundError:
            raise  # a missing optimizer shard is a setup problem, not corruption: say so
        except Exception as e:  # corrupt payload behind a correct size: try the previous step
            warnings.warn(
                f"checkpoint {path} failed to load ({type(e).__name__}: {e}); trying an older one",
                stacklevel=2,
            )
    raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir} (looked for step_*/meta.json)")


def _latest_tag(stage_dir: Path) -> str:
    best, best_time = None, -1.0
    if stage_dir.is_dir():
        for tag_dir in stage_dir.iterdir():
            for _, path in _list_step_dirs(tag_dir):
                meta_file = path / META_NAME
                if meta_file.exists() and meta_file.stat().st_mtime > best_time:
                    best, best_time = tag_dir.name, meta_file.stat().st_mtime
    if best is None:
        raise FileNotFoundError(
            f"no checkpoints under {stage_dir}: train that stage first "
            f"(e.g. uv run python -m scripts.base_train) or pass the right --tag"
        )
    return best


def load_model(
    stage: str, tag: str | None = None, step: int | None = None, device=None, phase: str = "eval"
):
    """-> (model: GPT, tokenizer, meta) from <base>/checkpoints/<stage>/<tag>, in `phase` mode.

    tag None: the tag whose newest checkpoint was written last. The tokenizer is the one the
    checkpoint records, else tokenizer_dir(). For entry points: what a user can fix (no checkpoint,
    the wrong tokenizer) ends the program with a one-line message (SystemExit)."""
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    # imported here: the checkpoint utilities must not need the model to import
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    device = torch.device(device) if device is not None else autodetect_device()
    stage_dir = get_base_dir() / "checkpoints" / stage
    try:
        tag = tag or _latest_tag(stage_dir)
        model_state, _, meta = load_checkpoint(stage_dir / tag, step=step, device=device)
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc}") from None
    if model_state is None:
        raise FileNotFoundError(
            f"{stage_dir / tag}: checkpoint step {meta.get('step')} has no model.pt"
        )
    if "model_config" not in meta:
        raise KeyError(
            f"{stage_dir / tag}: meta.json of step {meta.get('step')} has no 'model_config'"
        )
    config = GPTConfig(**meta["model_config"])
    where = f"{stage_dir / tag} step {meta.get('step')}"
    try:
        tokenizer = get_tokenizer(checkpoint_tokenizer_dir(meta))
    except (
        FileNotFoundError,
        ValueError,
    ) as exc:  # missing or damaged: the message names the files
        raise SystemExit(f"{where} needs its tokenizer: {exc}") from None
    check_tokenizer(meta, tokenizer, config.vocab_size, where)
    with torch.device("meta"):  # no throwaway random init of a big model on the CPU
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # also fills the non-persistent rotary tables, which the state_dict lacks
    model.load_state_dict(clean_state_dict(model_state), strict=True)
    if phase == "train":
        model.train()
    else:
        model.eval()
    return model, tokenizer, meta


def add_load_args(parser) -> None:
    """-i/--stage, --tag, --step: which checkpoint an evaluation script loads with load_model."""
    parser.add_argument(
        "-i", "--stage", default="base", choices=CHECKPOINT_STAGES, help="checkpoint stage"
    )
    parser.add_argument(
        "--tag", default=None, help="checkpoint tag (default: the most recently written one)"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the newest complete one)"
    )


def checkpoint_tokenizer_dir(meta: dict) -> Path | None:
    """The tokenizer directory a checkpoint records (relative paths are under the base dir), when it
    exists; None (the default tokenizer_dir()) for checkpoints that record none."""
    record = meta.get("tokenizer") or {}
    if not record.get("dir"):
        return None
    directory = get_base_dir() / record["dir"]  # an absolute recorded path stays absolute
    return directory if directory.is_dir() else None


def check_tokenizer(meta: dict, tokenizer, model_vocab: int, where: str) -> None:
    """Refuse a tokenizer other than the one the model was trained with: its ids would mean other
    tokens (and ids past the model's vocabulary crash the embedding)."""
    record = meta.get("tokenizer") or {}
    have = tokenizer.fingerprint() if record.get("ranks_sha256") else None
    directory = tokenizer.directory or "the tokenizer"
    if have is not None and have["ranks_sha256"] != record["ranks_sha256"]:
        raise SystemExit(
            f"{where} was trained with another tokenizer ({record['vocab_size']} tokens, "
            f"ranks sha256 {record['ranks_sha256'][:12]}) than {directory} "
            f"({have['vocab_size']} tokens, {have['ranks_sha256'][:12]}): it was retrained since. "
            f"Point NANOCHAT_TOKENIZER_DIR at the run's own tokenizer, or retrain from the base "
            f"stage (run_aquarat_small.sh --from tokenizer)."
        )
    if tokenizer.get_vocab_size() > model_vocab:
        raise SystemExit(
            f"{where}: the tokenizer at {directory} has {tokenizer.get_vocab_size()} tokens but "
            f"the model only {model_vocab}: not the tokenizer it was trained with (retrain from "
            f"the base stage, or point NANOCHAT_TOKENIZER_DIR at the right one)"
        )


# ----------------------------------------------------------------------------------------------
# RNG state (JSON-able, for meta.json / rank_state)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def save_rng_state() -> dict:
    """The Python, NumPy, torch CPU and (when CUDA is in use) local CUDA generators, as JSON-able
    data."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # only the current device (init_distributed set it to this rank's GPU): reading every
        # device's state would create a CUDA context on all of them from every rank
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def restore_rng_state(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        saved = state["cuda"]
        if isinstance(saved, list):  # older checkpoints held every device's state
            device = torch.cuda.current_device()
            saved = saved[device] if device < len(saved) else None
        if saved is not None:
            torch.cuda.set_rng_state(_unb64(saved))  # the current device
