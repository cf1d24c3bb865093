"""The soup's preprocessor: the base's tokenizer (text) or image processor (images), saved beside the soup.

transformers' image-processing module takes seconds to import, so it is imported only when a folder has an
image processor's config: a plain merge of text models never pays for it.
"""

from __future__ import annotations

from pathlib import Path

from ..candidates.compat import CompatibilityReport
from ..checkpoints.vocab import tokenizer_files
from ..errors import ConfigError

# transformers.utils' IMAGE_PROCESSOR_NAME and PROCESSOR_NAME (spelled out: `import transformers` costs most of a second).
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def load_preprocessor(report: CompatibilityReport, image: bool):
    """The soup's tokenizer (text) or image processor (images), from the base or else the first candidate.

    A folder without tokenizer files is skipped: transformers would build an empty tokenizer from its config. A
    model with neither (a plain merge of image models, say) gets its image processor, if it has one.
    """
    folders = [report.base.local_dir, report.accepted[0].local_dir]
    for folder in [] if image else folders:
        if tokenizer_files(Path(folder)):
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
            except (OSError, ValueError, TypeError):
                continue
            return _with_added_tokens(tokenizer, report), folder
    try:
        return load_image_processor(folders)
    except ConfigError:
        if image:
            raise
        return None, None


def load_image_processor(folders: list[Path]):
    """The first `AutoImageProcessor` found in `folders` (the base first), and where it came from."""
    for folder in folders:
        if not any((Path(folder) / name).is_file() for name in IMAGE_PROCESSOR_FILES):
            continue
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(folder), folder
        except (OSError, ValueError, TypeError, KeyError):
            continue
    raise ConfigError(
        f"Neither {' nor '.join(str(f) for f in folders)} has an image processor ({IMAGE_PROCESSOR_FILES[0]}); save "
        "it next to the base model (`AutoImageProcessor.from_pretrained(...).save_pretrained(base_dir)`)."
    )


def _with_added_tokens(tokenizer, report: CompatibilityReport):
    """With `--vocab union`, the soup's tokenizer gets the candidates' added tokens, in the soup's row order."""
    vocab = report.alignment.vocab
    if vocab is not None and vocab.added:
        from tokenizers import AddedToken

        tokenizer.add_tokens(
            [AddedToken(t.content, special=t.special, normalized=not t.special) for t in vocab.added]
        )
    return tokenizer
