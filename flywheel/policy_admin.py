"""Promote and roll back policy versions: what ``flywheel promote``/``flywheel rollback`` and the
serving process's Admin.Promote/Admin.Rollback both do.

It depends on the version registry and Redis only (serving may not import the training code),
and every change lands in the registry's audit stream with who and why and is PUBLISHed on
``flywheel:registry:policy``, which the servers follow. Version 0 is the base model: it has no
record; the pointer stores 0 for it explicitly (an absent pointer means it was lost).

An operator's rollback also freezes automatic promotion (a training run that started from the
version just rolled back must not promote its child); ``resume_promotion`` (``flywheel promote
--resume``, Admin.ResumePromotion) lifts it. An operator's own promotion works while frozen and
leaves the freeze in place.
"""

from __future__ import annotations

from flywheel.contracts.artifacts import ArtifactError, verify_version
from flywheel.registry import CURRENT, REJECTED, SUPERSEDED, VersionRecord, VersionRegistry


class PolicyNotFoundError(ValueError):
    """The named version does not exist (gRPC: NOT_FOUND); other refusals are plain ValueErrors."""


class PolicyNotServableError(ValueError):
    """The named version exists but its artifacts do not check out (gRPC: FAILED_PRECONDITION)."""


def check_servable(registry: VersionRegistry, version: int) -> None:
    """Raise unless ``version`` (> 0) exists with artifacts whose checksums match its manifest."""
    if registry.get(version) is None:
        raise PolicyNotFoundError(f"policy v{version} does not exist")
    if not registry.path(version).is_dir():
        raise PolicyNotServableError(f"policy v{version} has no artifacts on disk")
    try:
        verify_version(registry.path(version))
    except ArtifactError as exc:
        raise PolicyNotServableError(f"policy v{version} cannot be served: {exc}") from exc


def promote_policy(registry: VersionRegistry, version: int, who: str, why: str) -> VersionRecord | None:
    """Make ``version`` the served policy (0 = the base model). A rejected version may be promoted
    by hand (an operator's override, recorded as such)."""
    if version == 0:
        if registry.pointer() == 0:
            raise ValueError("the base model (v0) is already current")
        return registry.promote(0, who, why or "promote the base model")
    check_servable(registry, version)
    record = registry.get(version)
    if record.status == CURRENT and registry.current_version() == version:
        raise ValueError(f"policy v{version} is already current")
    if record.status == REJECTED:
        why = f"{why} (overrides the gate's rejection)" if why else "overrides the gate's rejection"
    return registry.promote(version, who, why)


def rollback_target(registry: VersionRegistry) -> int:
    """The previous good version: the newest version older than the current one that was served
    until a newer one replaced it (``superseded``; a ``rolled_back`` one was bad), else 0 (the base)."""
    current = registry.current_version()
    if current == 0:
        raise ValueError("the base model (v0) is already current: nothing to roll back")
    for record in reversed(registry.versions()):
        if record.version < current and record.status == SUPERSEDED:
            return record.version
    return 0


def rollback_policy(registry: VersionRegistry, to_version: int | None, who: str, why: str) -> VersionRecord | None:
    """Point the served policy back at ``to_version`` (None = the previous good version; 0 = the
    base model). The version left is marked ``rolled_back``."""
    target = rollback_target(registry) if to_version is None else int(to_version)
    if target == registry.pointer():
        raise ValueError(f"policy v{target} is already current")
    if target:
        check_servable(registry, target)
    return registry.rollback(target, who, why or "rollback")


def resume_promotion(registry: VersionRegistry, who: str, why: str) -> bool:
    """Let training runs promote again after a rollback froze them; False when nothing was frozen."""
    return registry.resume(who, why or "automatic promotion resumed by an operator")


def freeze_reason(frozen: dict | None) -> str:
    """A rollback's freeze in words, for GetStatus and ``flywheel status``."""
    if not frozen:
        return ""
    return (f"{frozen.get('who') or 'someone'} rolled back to v{frozen.get('version', 0)}"
            f" ({frozen.get('why') or 'no reason given'})")
