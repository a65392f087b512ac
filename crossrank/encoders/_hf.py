"""Loading transformers parts from a local directory quietly, with errors a user can act on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossrank.errors import ModelError

__all__ = ["quiet_transformers", "load_weights", "load_processors", "one_line"]

logger = logging.getLogger(__name__)

# transformers loggers whose warnings at load time we either cannot act on (the CLIPImageProcessor
# -> CLIPImageProcessorPil fallback without torchvision) or check ourselves (the weight loading
# report: load_weights raises on missing weights and logs unexpected ones at debug).
_QUIET_LOGGERS = ("transformers.utils.import_utils", "transformers.modeling_utils")
_QUIET_BARS = frozenset({"Loading weights"})

# A tokenizer is saved as at least one of these (fast tokenizers: tokenizer.json; slow BPE:
# vocab.json + merges.txt; WordPiece: vocab.txt; SentencePiece: *.model).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _drop_below_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first message line, cut to ``limit`` characters, for a one-line error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' weight-loading progress bar and load-time warnings in this block.

    Only the named loggers and progress bars are touched, and they are restored on exit; the rest
    of transformers' logging (and the caller's settings) is left alone.
    """
    from transformers.utils import logging as hf_logging

    # A filter rather than a level: transformers reads modeling_utils' logger level to decide what
    # to check (5.x runs a tensor-parallel plan check, with warnings of its own, when the level is
    # WARNING or above).
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    for lg in loggers:
        lg.addFilter(_drop_below_error)
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    previous: Any = None
    bars_were_on = None
    if set_hook is not None:

        def hook(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if kwargs.get("desc") in _QUIET_BARS:
                return hf_logging.EmptyTqdm(*args, **kwargs)
            return (
                previous(factory, args, kwargs)
                if previous is not None
                else factory(*args, **kwargs)
            )

        previous = set_hook(hook)
    else:  # older transformers: no hook, so switch its bars off for the block
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if set_hook is not None:
            set_hook(previous)
        elif bars_were_on:
            hf_logging.enable_progress_bar()
        for lg in loggers:
            lg.removeFilter(_drop_below_error)


def load_weights(model_cls: Any, model_dir: Path, model_id: str) -> Any:
    """``model_cls.from_pretrained(model_dir)``, refusing a checkpoint with weights missing.

    Args:
        model_cls: a transformers model class (``CLIPModel``, ...).
        model_dir: a local directory in Hugging Face format.
        model_id: what the user asked for, for messages.

    Returns:
        The model, in eval mode, with the checkpoint's weights.

    Raises:
        ModelError: the weights do not load, or some of the model's weights are not in the
            checkpoint (transformers would initialise them at random).
    """
    name = model_cls.__name__
    try:
        model, loading_info = model_cls.from_pretrained(
            model_dir, local_files_only=True, output_loading_info=True
        )
    except (
        Exception
    ) as e:  # transformers raises OSError, ValueError, RuntimeError (size mismatch), ...
        raise ModelError(
            f"cannot load model {model_id!r} as a {name} from {model_dir}: {one_line(e)}"
        ) from e
    missing = sorted(loading_info.get("missing_keys") or [])
    if missing:
        raise ModelError(
            f"model {model_id!r} in {model_dir} is not a complete {name}: "
            f"{len(missing)} weight(s) are missing from its checkpoint (first: "
            f"{missing[0]}); pass a directory saved with {name}.save_pretrained"
        )
    unexpected = sorted(loading_info.get("unexpected_keys") or [])
    if unexpected:
        logger.debug(
            "%s: %d checkpoint weight(s) unused by %s (first: %s)",
            model_id,
            len(unexpected),
            name,
            unexpected[0],
        )
    return model.eval()


def load_processors(model_dir: Path, model_id: str) -> tuple[Any, Any]:
    """The model's own image processor and tokenizer, from the same directory.

    Args:
        model_dir: a local directory in Hugging Face format.
        model_id: what the user asked for, for messages.

    Returns:
        ``(image_processor, tokenizer)``.

    Raises:
        ModelError: either is missing or does not load.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise ModelError(
            f"model {model_id!r} has no usable image processor in "
            f"{model_dir} (preprocessor_config.json): {one_line(e)}; "
            "save the model's processor beside its weights"
        ) from e
    # Without any tokenizer file AutoTokenizer does not fail: it builds an empty tokenizer of the
    # config's model type (a 2-token CLIPTokenizer), which would encode every query to nothing.
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"model {model_id!r} has no usable tokenizer in {model_dir}: none of "
            f"{', '.join(_TOKENIZER_FILES)} is there; save the model's tokenizer beside its weights"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise ModelError(
            f"model {model_id!r} has no usable tokenizer in {model_dir}: {one_line(e)}; "
            "save the model's tokenizer beside its weights"
        ) from e
    return image_processor, tokenizer
