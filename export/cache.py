"""The export cache: content-hash keys, the manifest, validation, and `find_export`.

An export folder is named by a key: the sha256 of everything its files depend on (the source
model's weights and configs, the export options, the torch / onnx / onnxscript / onnxruntime
versions). A folder only counts when its `manifest.json` (written last, after the checks passed)
parses, carries the expected key, and every file it lists still has the recorded sha256. So a
changed model, an upgraded exporter, a half-written or a damaged folder is never reused: it is
rebuilt. "The file exists" is never the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from fastdiff import iospec, sd15

FORMAT = 2  # bump when the export layout or its meaning changes (2: vae_encoder/ added)
MANIFEST = "manifest.json"
ATTENTION = ("mha", "plain")


@dataclass(frozen=True)
class Shapes:
    """Fixed sizes for a static export: `batch` images of `height` x `width` pixels.

    The text encoder and UNet are exported for 2 * batch rows (classifier-free guidance runs the
    negative and positive prompts together), the VAE decoder and encoder for `batch` (img2img
    encodes each init image once per call).
    """

    batch: int
    height: int
    width: int


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"  # "fp32" | "fp16"
    static: Shapes | None = None  # None: dynamic batch / height / width
    attention: str = "mha"  # "mha": com.microsoft MultiHeadAttention nodes (onnxruntime); "plain": MatMul/Softmax/MatMul
    opset: int = 20
    random_weights: bool = False  # SD1.5 architecture with random weights (timing only)

    def __post_init__(self):
        if self.precision not in iospec.PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: allowed values are {', '.join(iospec.PRECISIONS)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}: allowed values are {', '.join(ATTENTION)}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["static"] = asdict(self.static) if self.static else None
        return d


def cache_root() -> Path:
    """$FASTDIFF_CACHE, else ~/.cache/fastdiff."""
    env = os.environ.get("FASTDIFF_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/fastdiff").expanduser()


def exports_dir() -> Path:
    return cache_root() / "exports"


# ----------------------------------------------------------------------------------------------
# hashing

_memo: dict[tuple, str] = {}
_memo_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes.

    Remembered per (path, size, mtime, inode) in this process and in `<cache>/sha256.json`, so a
    4 GB checkpoint is read once, not on every load; any write to the file changes that stat
    identity and the bytes are hashed again.
    """
    path = Path(path).resolve()
    st = path.stat()
    ident = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    with _memo_lock:
        if ident in _memo:
            return _memo[ident]
    disk = _load_disk_memo()
    entry = disk.get(str(path))
    if entry and tuple(entry[:3]) == ident[1:]:
        digest = entry[3]
    else:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        digest = h.hexdigest()
        if st.st_size >= 1 << 26:  # only big files are worth a disk entry
            disk[str(path)] = [st.st_size, st.st_mtime_ns, st.st_ino, digest]
            _save_disk_memo(disk)
    with _memo_lock:
        _memo[ident] = digest
    return digest


def _disk_memo_path() -> Path:
    return cache_root() / "sha256.json"


def _load_disk_memo() -> dict:
    try:
        return json.loads(_disk_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_disk_memo(d: dict) -> None:
    path = _disk_memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(d))
        os.replace(tmp, path)
    except OSError:
        pass  # a memo that cannot be written only costs time


def source_files(model_root: Path) -> list[Path]:
    """The files of a diffusers model that an export depends on (weights, configs, tokenizer)."""
    from fastdiff.weights import find_weights

    root = Path(model_root)
    files = [root / "model_index.json", root / "scheduler" / "scheduler_config.json"]
    files += sorted(p for p in (root / "tokenizer").iterdir() if p.is_file())
    for sub in ("text_encoder", "unet", "vae"):
        files += [root / sub / "config.json", find_weights(root / sub)]
    return files


def source_hash(model_root: Path) -> str:
    """sha256 over the (relative name, sha256) of every file in `source_files`."""
    root = Path(model_root)
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def with_adapters(source_sha256: str, adapters: dict[str, float] | None) -> str:
    """The source hash of a model with LoRA adapters merged ({path: weight}): the model's, then
    `fastdiff.lora.content_hash` of the adapters; the model's own without adapters."""
    if not adapters:
        return source_sha256
    from fastdiff.lora import content_hash

    return hashlib.sha256(f"{source_sha256}\0lora\0{content_hash(adapters)}".encode()).hexdigest()


def prune_adapted(keep_folder: Path, base_sha256: str, limit: int | None = None) -> list[Path]:
    """Remove the oldest exports of the same base model with other LoRA adapters beyond `limit`
    ($FASTDIFF_LORA_EXPORTS, default 4) in keep_folder's parent, `keep_folder` never: each is a
    whole copy of the model (SD1.5: GBs), so the disk a run of adapter changes takes is bounded.
    Age is the manifest's mtime, which a reuse renews (`touch_manifest`). Returns what was removed."""
    if limit is None:
        env = os.environ.get("FASTDIFF_LORA_EXPORTS", "4")
        limit = int(env) if env.strip().isdigit() else 4
    limit = max(1, limit)
    others = []
    for folder in Path(keep_folder).parent.iterdir():
        m = read_manifest(folder) if folder != keep_folder and folder.is_dir() else None
        if m and m.get("adapters") and (m.get("model") or {}).get("base_source_sha256") == base_sha256:
            try:
                others.append(((folder / MANIFEST).stat().st_mtime, folder))
            except OSError:  # removed meanwhile by another process's prune
                continue
    others.sort()  # oldest first
    removed = [folder for _, folder in others[: max(0, len(others) - (limit - 1))]]
    for folder in removed:
        with locked(folder.parent / f".{folder.name}.lock"):
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def touch_manifest(folder: Path) -> None:
    """Mark an export as just used (what `prune_adapted` orders by)."""
    try:
        os.utime(Path(folder) / MANIFEST)
    except OSError:
        pass


def random_source_hash(seed: int) -> str:
    """Stand-in source hash of a `--random-weights` export: the SD1.5 configs and the seed."""
    blob = json.dumps({"random_weights": True, "seed": seed, "configs": sd15.SD15_CONFIGS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def versions() -> dict[str, str | None]:
    """Versions of the tools that shape the files (keyed) and of TensorRT (recorded only)."""
    import importlib

    import onnxruntime  # required: an export is only usable (and checked) with it
    import torch

    def version(module: str) -> str | None:
        try:
            return importlib.import_module(module).__version__
        except ImportError:
            return None

    return {
        "torch": torch.__version__,
        "onnx": version("onnx"),
        "onnxscript": version("onnxscript"),
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": version("tensorrt"),
    }


def export_key(source_sha256: str, options: ExportOptions) -> str:
    """The content hash that names an export folder."""
    v = versions()
    v.pop("tensorrt")  # engines are keyed by their own TensorRT version, the ONNX files are not
    blob = json.dumps({"format": FORMAT, "source": source_sha256, "options": options.as_dict(), "versions": v}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def folder_name(model_name: str, options: ExportOptions, key: str) -> str:
    """e.g. sd15-fp16-dyn-mha-1a2b3c4d5e6f, sd15-random-fp32-b2x512x512-plain-..."""
    shape = f"b{options.static.batch}x{options.static.height}x{options.static.width}" if options.static else "dyn"
    random = "-random" if options.random_weights else ""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name) or "model"
    return f"{safe}{random}-{options.precision}-{shape}-{options.attention}-{key[:16]}"


def model_name(model, model_root: Path | None) -> str:
    """Short name for folder names: the known name given (sd15, tiny-shapes), else the folder's name."""
    from fastdiff.weights import MODELS

    if isinstance(model, str) and model in MODELS:
        return model
    return Path(model_root).name if model_root is not None else str(model)


# ----------------------------------------------------------------------------------------------
# manifest and validation


def read_manifest(folder: Path) -> dict | None:
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def write_manifest(folder: Path, manifest: dict) -> None:
    """Written last, through a temp file and a rename: its presence marks a complete folder."""
    folder = Path(folder)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def hash_files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` except the manifest."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def validate(folder: Path, key: str | None = None) -> tuple[bool, str]:
    """(ok, reason): is `folder` a complete export, with key `key` when given?"""
    folder = Path(folder)
    if not folder.is_dir():
        return False, "no such folder"
    m = read_manifest(folder)
    if m is None:
        return False, "manifest.json missing or not valid JSON"
    if m.get("format") != FORMAT:
        return False, f"manifest format {m.get('format')!r}, expected {FORMAT}"
    if key is not None and m.get("key") != key:
        return False, "manifest key differs (other model, options or tool versions)"
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return False, "manifest lists no files"
    for net in iospec.NETWORKS:
        if f"{net}/model.onnx" not in files:
            return False, f"manifest lacks {net}/model.onnx"
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            return False, f"{rel} is missing"
        if file_sha256(p) != digest:
            return False, f"{rel} differs from the manifest (sha256 mismatch)"
    return True, "ok"


def find_export(
    model_root: Path,
    precision: str = "fp32",
    *,
    static: Shapes | None = None,
    attention: str = "mha",
    out: Path | None = None,
    adapters: dict[str, float] | None = None,
) -> Path | None:
    """The valid export of `model_root` (with LoRA `adapters` merged) with these options in the
    cache (or at `out`), else None.

    Never returns a `--random-weights` export for a real model: its key is built from a different
    source hash, and its manifest says random.
    """
    options = ExportOptions(precision=precision, static=static, attention=attention)
    root = Path(model_root)
    if out is None and not (exports_dir().is_dir() and any(exports_dir().iterdir())):
        return None  # nothing cached: skip hashing the model
    try:
        key = export_key(with_adapters(source_hash(root), adapters), options)
    except FileNotFoundError:
        return None
    if out is not None:
        candidates = [Path(out)]
    else:  # folders are named <model>-<options>-<key[:16]>; the model part depends on how it was named
        parent = exports_dir()
        candidates = sorted(p for p in parent.iterdir() if p.name.endswith(f"-{key[:16]}")) if parent.is_dir() else []
    for folder in candidates:
        ok, _ = validate(folder, key)
        if ok and not read_manifest(folder).get("random_weights"):
            if adapters:
                touch_manifest(folder)
            return folder
    return None


# ----------------------------------------------------------------------------------------------
# atomic folder replacement and locking


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive advisory lock on `path` (a lock file), so two exporters of one key take turns."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` to `final`, first moving any old `final` aside and deleting it."""
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


def remove_stale_temps(parent: Path) -> None:
    """Delete `.tmp-*` / `.trash-*` folders left by exporters that died (their pid is gone)."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-", ".trash-")):
            try:
                pid = int(p.name.rsplit("-", 2)[-2] if p.name.startswith(".tmp-") else p.name.rsplit("-", 1)[-1])
            except ValueError:
                continue
            if pid != os.getpid() and not _alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
