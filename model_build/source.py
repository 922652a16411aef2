"""Stage 1, fetch: a hub repo at a revision, or a local directory in the hub's layout.

Hub sources go through `huggingface_hub.snapshot_download` with only the files the recipe needs. At
BAAI/bge-m3's pinned revision every file whose sha256 we know (the LFS pointers in
`reference/bge-m3/`) is checked, and a mismatch names the file. A hub that cannot be reached is one
clear error that says how to build from a local directory instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from handler.engine.manifest import sha256_file
from model_build.errors import BuildError, HubUnreachableError, SourceError
from model_build.progress import Progress

BGE_M3_REPO = "BAAI/bge-m3"
PINNED_REVISION = "5617a9f61b028005a4858fdac845db406aefb181"
LFS_POINTERS = Path(__file__).parent / "reference" / "bge-m3" / "LFS_POINTERS_from_KLTN_Nop1.txt"

Recipe = Literal["bge-m3", "dense"]

# Each entry is one requirement; a tuple lists alternatives, the first present one is used.
# BAAI/bge-m3 ships pytorch_model.bin only; safetensors is preferred where a repo has both.
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
REQUIRED_FILES: dict[Recipe, tuple[tuple[str, ...], ...]] = {
    "bge-m3": (
        ("config.json",),
        _WEIGHTS,
        ("tokenizer.json",),
        ("tokenizer_config.json",),
        ("special_tokens_map.json",),
        ("colbert_linear.pt",),
        ("sparse_linear.pt",),
    ),
    "dense": (
        ("config.json",),
        _WEIGHTS,
        ("tokenizer.json",),
        ("modules.json",),
    ),
}
# Read when present (special token names, max_seq_length); the pooling config's folder comes from
# modules.json and is checked once that is read.
OPTIONAL_FILES: dict[Recipe, tuple[str, ...]] = {
    "bge-m3": (),
    "dense": (
        "tokenizer_config.json",
        "special_tokens_map.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ),
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass
class SourceInfo:
    path: Path  # a directory in the hub's layout
    repo: str | None  # hub repo id, None for a local directory
    revision: str | None  # the commit the files came from (hub), None for a local directory
    requested_revision: str | None
    local_dir: str | None
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256 of the files used
    verified: list[str] = field(default_factory=list)  # names checked against known digests

    @property
    def weights_file(self) -> str:
        return next(name for name in _WEIGHTS if (self.path / name).is_file())


def needed_files_text(recipe: Recipe) -> str:
    parts = [" or ".join(alts) for alts in REQUIRED_FILES[recipe]]
    return ", ".join(parts)


def default_revision(repo: str) -> str:
    return PINNED_REVISION if repo == BGE_M3_REPO else "main"


def known_digests(pointers: Path = LFS_POINTERS) -> dict[str, tuple[str, int]]:
    """sha256 and size by file name, from the `bge-m3/<file>` entries of the LFS pointer list.

    The file is a series of `== bge-m3/<path>` headers, each followed by a git-lfs pointer
    (`oid sha256:<hex>`, `size <n>`).
    """
    digests: dict[str, tuple[str, int]] = {}
    name: str | None = None
    oid: str | None = None
    for raw in pointers.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("== "):
            name, oid = line[3:].strip(), None
        elif name is not None and line.startswith("oid sha256:"):
            oid = line.split(":", 1)[1].strip()
        elif name is not None and oid is not None and line.startswith("size "):
            if name.startswith("bge-m3/"):
                digests[name[len("bge-m3/") :]] = (oid, int(line.split()[1]))
            name, oid = None, None
    return digests


def is_local_source(source: str) -> bool:
    path = Path(source).expanduser()
    if path.exists():
        return True
    # "org/name" could be either; an existing path wins above, everything else shaped like a repo
    # id goes to the hub.
    return not _REPO_ID.match(source)


def check_layout(path: Path, recipe: Recipe) -> None:
    """Every required file is present; the error names the first missing one."""
    for alternatives in REQUIRED_FILES[recipe]:
        if not any((path / name).is_file() for name in alternatives):
            missing = " or ".join(alternatives)
            raise SourceError(
                f"{path}: missing {missing} "
                f"(the {recipe} recipe needs: {needed_files_text(recipe)})"
            )


def resolve_source(
    source: str,
    recipe: Recipe,
    *,
    revision: str | None,
    cache_dir: Path | None,
    progress: Progress,
) -> SourceInfo:
    if is_local_source(source):
        path = Path(source).expanduser().resolve()
        if not path.is_dir():
            raise SourceError(f"--source {source}: no such directory")
        if revision is not None:
            progress.log("fetch", f"--revision {revision} is ignored for a local directory")
        check_layout(path, recipe)
        info = SourceInfo(
            path=path, repo=None, revision=None, requested_revision=None, local_dir=str(path)
        )
    else:
        info = _fetch_from_hub(
            source, recipe, revision=revision, cache_dir=cache_dir, progress=progress
        )
    info.files = {name: sha256_file(info.path / name) for name in _present_files(info.path, recipe)}
    return info


def _present_files(path: Path, recipe: Recipe) -> list[str]:
    names = [name for alts in REQUIRED_FILES[recipe] for name in alts]
    names += list(OPTIONAL_FILES[recipe])
    return [name for name in names if (path / name).is_file()]


def _allow_patterns(recipe: Recipe) -> list[str]:
    names = [name for alts in REQUIRED_FILES[recipe] for name in alts]
    names += list(OPTIONAL_FILES[recipe])
    return names


def _unreachable(
    repo: str, revision: str, recipe: Recipe, cause: BaseException
) -> HubUnreachableError:
    from huggingface_hub import constants

    reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return HubUnreachableError(
        f"hub unreachable: cannot fetch {repo}@{revision} from {constants.ENDPOINT} "
        f"({type(cause).__name__}: {reason}) and no complete copy is cached; "
        f"download the files elsewhere and use --source /path/to/dir "
        f"(the {recipe} recipe needs: {needed_files_text(recipe)})"
    )


def _fetch_from_hub(
    repo: str,
    recipe: Recipe,
    *,
    revision: str | None,
    cache_dir: Path | None,
    progress: Progress,
) -> SourceInfo:
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    requested = revision or default_revision(repo)
    network_errors = (httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError)
    commit: str | None = None
    unreachable: BaseException | None = None
    # One metadata call first: it resolves the revision to a commit and fails fast (no retries)
    # when the hub is unreachable, where a tree listing would back off for half a minute.
    try:
        commit = HfApi().model_info(repo, revision=requested, timeout=20).sha
    except RevisionNotFoundError as exc:
        raise SourceError(f"hub repo {repo} has no revision {requested!r}") from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise SourceError(
            f"hub repo {repo} not found, or it is private/gated: check the name, or set HF_TOKEN"
        ) from exc
    except network_errors as exc:
        unreachable = exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status is not None and status < 500 and status not in (408, 429):
            raise SourceError(f"hub refused {repo}@{requested}: {exc}") from exc
        unreachable = exc

    patterns = _allow_patterns(recipe)
    try:
        if unreachable is None:
            progress.log("fetch", f"{repo}@{requested} -> commit {commit}")
            path = snapshot_download(
                repo,
                revision=commit or requested,
                allow_patterns=patterns,
                cache_dir=str(cache_dir) if cache_dir else None,
            )
        else:
            progress.log(
                "fetch", f"hub unreachable ({type(unreachable).__name__}); trying the cache"
            )
            path = snapshot_download(
                repo,
                revision=requested,
                allow_patterns=patterns,
                cache_dir=str(cache_dir) if cache_dir else None,
                local_files_only=True,
            )
            commit = Path(path).name
    except RevisionNotFoundError as exc:
        raise SourceError(f"hub repo {repo} has no revision {requested!r}") from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise SourceError(
            f"hub repo {repo} not found, or it is private/gated: check the name, or set HF_TOKEN"
        ) from exc
    except (*network_errors, HfHubHTTPError) as exc:
        raise _unreachable(repo, requested, recipe, unreachable or exc) from exc
    except OSError as exc:  # disk full, permissions, a broken cache: not the network
        raise SourceError(f"fetching {repo}@{requested} failed: {exc}") from exc

    snapshot = Path(path)
    try:
        check_layout(snapshot, recipe)
    except SourceError as exc:
        raise SourceError(
            f"hub repo {repo}@{requested}: {exc}".replace(f"{snapshot}: ", "")
        ) from exc
    info = SourceInfo(
        path=snapshot, repo=repo, revision=commit, requested_revision=requested, local_dir=None
    )
    if repo == BGE_M3_REPO and commit == PINNED_REVISION:
        info.verified = verify_known_digests(snapshot, progress)
    else:
        progress.log("fetch", f"no known digests for {repo}@{commit}; files not pinned")
    return info


def verify_known_digests(path: Path, progress: Progress) -> list[str]:
    """Check every present file with a known sha256 (pinned BAAI/bge-m3 revision only)."""
    verified: list[str] = []
    bad: list[str] = []
    for name, (digest, size) in sorted(known_digests().items()):
        file = path / name
        if not file.is_file():
            continue
        actual_size = file.stat().st_size
        actual = sha256_file(file)
        if actual != digest or actual_size != size:
            bad.append(
                f"{name} (sha256 {actual[:12]}…, {actual_size} bytes; "
                f"expected {digest[:12]}…, {size} bytes)"
            )
        else:
            verified.append(name)
    if bad:
        raise SourceError(
            f"{BGE_M3_REPO}@{PINNED_REVISION}: sha256 mismatch for {', '.join(bad)}; "
            "the download is corrupt or not the pinned model (delete it from the cache and retry)"
        )
    progress.log("fetch", f"sha256 verified: {', '.join(verified) or 'none'}")
    return verified


def validate_source_arg(source: str) -> None:
    if not source.strip():
        raise BuildError("--source must not be empty")
