"""Why a model or a ControlNet failed to load, as one error with the right exit code: missing while
offline, not on the hub, unreachable hub, pickle refused, or a load that failed."""

from __future__ import annotations

from ..errors import EnvironmentProblem, UsageError
from ..models.modelref import ModelRef

def hub_unreachable(exc: BaseException) -> bool:
    """Whether a load failed because the hub could not be reached (no network, DNS, a refused or timed-out
    connection): huggingface_hub and diffusers wrap the connection error in their own, so look down the chain."""
    seen = 0
    while exc is not None and seen < 20:
        name = type(exc).__name__
        text = str(exc)
        if name in ("LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ConnectionError", "ReadTimeout",
                    "NameResolutionError") or isinstance(exc, (ConnectionError, TimeoutError)) or \
                "error occurred while trying to fetch metadata from the Hub" in text or \
                "trying to locate the file on the Hub" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def offline_missing(ref: ModelRef) -> EnvironmentProblem:
    return EnvironmentProblem(f"{ref.name} is not in the Hugging Face cache and offline mode is on",
                              hint=f"download it once online (`hf download {ref.source}`) or drop --offline")


def loading_error(ref: ModelRef, exc: Exception, offline: bool, allow_pickle: bool = False) -> Exception:
    """Map an exception from hub / diffusers / safetensors to a SanaError with the right exit code."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if isinstance(exc, (UsageError, EnvironmentProblem)):
        return exc
    if name in ("GatedRepoError",):
        return EnvironmentProblem(f"{ref.name} is gated on the Hugging Face hub and needs an accepted licence",
                                  hint="accept it on the model page, then `hf auth login`")
    if name in ("RepositoryNotFoundError",):
        return EnvironmentProblem(f"model '{ref.source}' was not found on the Hugging Face hub")
    if name in ("RevisionNotFoundError",):
        return EnvironmentProblem(f"revision '{ref.revision}' of {ref.source} was not found")
    if not offline and hub_unreachable(exc):
        return EnvironmentProblem(f"{ref.name} is not fully in the Hugging Face cache and the hub cannot be reached",
                                  hint=f"check the network (and HF_ENDPOINT), or download it where the hub is "
                                       f"reachable (`hf download {ref.source}`) and copy the cache here")
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or (
            offline and ("local cache" in text or "offline" in text.lower() or "Cannot find" in text)):
        return offline_missing(ref)
    if name in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeaderDeserialization") or \
            "deserializ" in text.lower() or "incomplete metadata" in text.lower() or \
            "unable to load weights from checkpoint" in text.lower():
        return EnvironmentProblem(f"the weights of {ref.name} are corrupt or truncated: {text}",
                                  hint="delete and download them again")
    if ("safetensors" in text.lower() or "no file named" in text.lower()) and not allow_pickle and \
            ("bin" in text or "no file named" in text.lower()):
        return EnvironmentProblem(f"{ref.name} has no safetensors weights; sana-cli does not load pickle files "
                                  "by default", hint="--allow-pickle loads .bin weights if you trust the source")
    if isinstance(exc, ImportError):
        return EnvironmentProblem(f"loading {ref.name} needs a missing package: {text}")
    if isinstance(exc, (OSError, ValueError, KeyError, EnvironmentError)):
        return EnvironmentProblem(f"cannot load {ref.name}: {text}")
    return exc
