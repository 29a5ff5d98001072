"""The Llama-3.2 text tokenizer and CSM's `[speaker]text` framing.

The reference (Sesame's generator) tokenizes `f"[{speaker}]{text}"` with the Llama-3.2 tokenizer and wraps it in
`<|begin_of_text|>` ... `<|end_of_text|>`. Offline, the default is Meta's own `tokenizer.model` shipped in the
`llama-models` package (tiktoken BPE, 128000 ranks + 256 special tokens), which gives the same ids as the hub's
`meta-llama/Llama-3.2-1B` tokenizer. A local directory holding `tokenizer.json` (or `tokenizer.model`), or a hub
id, is read with the `tokenizers` library instead.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from csm_jax.core.errors import UserError

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"


class TokenizerError(UserError):
    """A tokenizer source that cannot be loaded."""


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """Plain-text encoding (no special tokens added) plus the ids that frame a segment."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    bos_id: int
    eos_id: int
    vocab_size: int
    source: str


def default_tokenizer_model() -> Path:
    """The `tokenizer.model` that the `llama-models` package ships (Llama-3 tiktoken ranks)."""
    try:
        import llama_models
    except ImportError:
        raise TokenizerError("the offline default tokenizer needs the `llama-models` package: pip install "
                             "llama-models, or pass a tokenizer directory or hub id (e.g. unsloth/Llama-3.2-1B)")
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def load_tokenizer(path_or_id: str | os.PathLike | None = None) -> TextTokenizer:
    """Loads the Llama-3 tokenizer.

    None: the offline default (`llama-models`' tokenizer.model). A `tokenizer.model` file, or a directory holding
    one, is read with tiktoken; a directory or file with `tokenizer.json` with `tokenizers`; anything else is
    taken as a hub id (e.g. "unsloth/Llama-3.2-1B") and fetched with `tokenizers`.
    """
    if path_or_id is None:
        return _tiktoken_tokenizer(default_tokenizer_model())
    path = Path(path_or_id)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return _hf_tokenizer(str(path / "tokenizer.json"), from_file=True)
        if (path / "tokenizer.model").exists():
            return _tiktoken_tokenizer(path / "tokenizer.model")
        raise TokenizerError(f"{path} holds neither tokenizer.json nor tokenizer.model; point --tokenizer at a "
                             f"Llama-3 tokenizer directory, or leave it unset for the offline default")
    if path.is_file():
        if path.suffix == ".json":
            return _hf_tokenizer(str(path), from_file=True)
        return _tiktoken_tokenizer(path)
    from csm_jax.io.hub import looks_like_hub_id

    if not looks_like_hub_id(path_or_id):
        raise TokenizerError(f"tokenizer {path_or_id} does not exist; give a Llama-3 tokenizer directory or file "
                             f"(tokenizer.json or tokenizer.model), a hub id such as unsloth/Llama-3.2-1B, or nothing "
                             f"for the offline default")
    return _hf_tokenizer(str(path_or_id), from_file=False)


def _tiktoken_tokenizer(model_path: Path) -> TextTokenizer:
    """Meta's own loader: BPE ranks from the file, then the 256 Llama-3 special tokens numbered after them."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    if not model_path.exists():
        raise TokenizerError(f"tokenizer file {model_path} does not exist")
    try:
        meta = MetaTokenizer(model_path)
    except Exception as e:  # tiktoken's reader fails with ValueError, binascii.Error, UnicodeDecodeError, ...
        raise TokenizerError(f"{model_path} is not a tiktoken tokenizer.model ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]}); give a Llama-3 tokenizer.model or "
                             f"tokenizer.json, or nothing for the offline default") from None
    enc = meta.model
    # Special-token text inside user text becomes the special token, as with the reference's HF tokenizer.
    return TextTokenizer(encode=lambda s: enc.encode(s, allowed_special="all"), decode=enc.decode,
                         bos_id=meta.bos_id, eos_id=meta.eos_id, vocab_size=meta.n_words, source=str(model_path))


def _hf_tokenizer(source: str, from_file: bool) -> TextTokenizer:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(source) if from_file else Tokenizer.from_pretrained(source)
    except Exception as e:  # the library raises bare Exceptions for missing repos and network failures
        raise TokenizerError(f"could not load a tokenizer from {source!r} ({e}). Give a local directory with "
                             f"tokenizer.json, a reachable hub id (e.g. unsloth/Llama-3.2-1B), or nothing for the "
                             f"offline default") from None
    bos, eos = tok.token_to_id(BEGIN_OF_TEXT), tok.token_to_id(END_OF_TEXT)
    if bos is None or eos is None:
        raise TokenizerError(f"{source} is not a Llama-3 tokenizer: it has no {BEGIN_OF_TEXT} / {END_OF_TEXT} tokens")
    return TextTokenizer(encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
                         decode=lambda ids: tok.decode(ids, skip_special_tokens=False), bos_id=bos, eos_id=eos,
                         vocab_size=tok.get_vocab_size(), source=source)


def tokenize_segment_text(tokenizer: TextTokenizer, text: str, speaker: int | str) -> list[int]:
    """The reference's text of one segment: [<|begin_of_text|>] + ids(f"[{speaker}]{text}") + [<|end_of_text|>]."""
    return [tokenizer.bos_id, *tokenizer.encode(f"[{speaker}]{text}"), tokenizer.eos_id]
