"""CLIP tokenizer on the ``tokenizers`` library (no transformers).

Reproduces ``transformers.CLIPTokenizer`` (v5, tokenizers-backed) loaded from a
diffusers ``tokenizer/`` folder, as diffusers' pipelines call it::

    tok = CLIPTokenizer.from_pretrained("models/sd15/tokenizer")
    ids = tok(["a photo of a cat", "a fox"])          # int64 [2, 77]
    # == transformers: tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids

The backend pipeline is the one transformers builds:

* model: BPE on vocab.json / merges.txt, ``end_of_word_suffix="</w>"``, no
  continuing-subword prefix, ``unk_token`` from the config, no dropout, no unk fusing;
* normalizer: NFC, every run of whitespace -> one space, lowercase;
* pre-tokenizer: CLIP's regex (``<|startoftext|>``, ``<|endoftext|>``, contractions,
  letter runs, single digits, runs of other non-space characters; whitespace dropped),
  then byte-level mapping without prefix space;
* post-processor: ``<|startoftext|> ... <|endoftext|>`` (RobertaProcessing);
* decoder: byte-level, then ``</w>`` -> space and strip;
* added tokens: the special tokens of the folder (bos/eos/unk/pad, with the
  ``normalized`` flags that transformers ends up with; e.g. SD2's pad token ``!``
  is an added special token, so a ``!`` in a prompt is always its own token, id 0),
  plus ``added_tokens_decoder`` / ``added_tokens.json`` / tokenizer.json added tokens.

Files read: ``vocab.json`` + ``merges.txt`` (or the vocab and merges of a
``tokenizer.json``, which transformers 5 writes instead, and prefers when both
exist), ``tokenizer_config.json`` and ``special_tokens_map.json`` (optional; legacy
precedence: special_tokens_map.json overrides the config unless the config has an
``added_tokens_decoder``), ``added_tokens.json`` (optional).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .model_files import read_json

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"

# transformers' order; when two entries share a content, the later one's flags win.
SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
DEFAULT_MODEL_MAX_LENGTH = 77

CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
END_OF_WORD_SUFFIX = "</w>"

TRUNCATION_MESSAGE = (
    "The following part of your input was truncated because CLIP can only handle sequences up to {max_length} tokens: {removed}"
)

_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _added_token(spec: dict, *, special: bool | None = None) -> AddedToken:
    kwargs = {k: spec[k] for k in _ADDED_TOKEN_FIELDS if k in spec}
    if special is not None:
        kwargs["special"] = special
    content = kwargs.pop("content")
    return AddedToken(content, **kwargs)


def _as_token(value: Any) -> str | AddedToken | None:
    """A special-token value from a config file: a string, or a (``__type``) AddedToken dict."""
    if value is None or isinstance(value, (str, AddedToken)):
        return value
    if isinstance(value, dict) and "content" in value:
        return _added_token(value)
    raise TypeError(f"unsupported special token value {value!r}")


class CLIPTokenizer:
    """CLIP BPE tokenizer with transformers' ``CLIPTokenizer`` behaviour, returning numpy arrays.

    Attributes: ``model_max_length``, ``bos_token``/``eos_token``/``unk_token``/``pad_token``
    (strings) and their ``*_id`` counterparts, ``vocab_size``, ``backend`` (the
    ``tokenizers.Tokenizer``), ``padding_side``/``truncation_side`` ("right" unless the
    config says otherwise), ``name_or_path``.
    """

    def __init__(
        self,
        vocab: dict[str, int] | str | os.PathLike,
        merges: Sequence[tuple[str, str]] | str | os.PathLike,
        *,
        bos_token: str | AddedToken | None = DEFAULT_SPECIAL_TOKENS["bos_token"],
        eos_token: str | AddedToken | None = DEFAULT_SPECIAL_TOKENS["eos_token"],
        unk_token: str | AddedToken | None = DEFAULT_SPECIAL_TOKENS["unk_token"],
        pad_token: str | AddedToken | None = DEFAULT_SPECIAL_TOKENS["pad_token"],
        sep_token: str | AddedToken | None = None,
        cls_token: str | AddedToken | None = None,
        mask_token: str | AddedToken | None = None,
        extra_special_tokens: Iterable[str | AddedToken] = (),
        added_tokens_decoder: dict[int, AddedToken] | None = None,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        padding_side: str = "right",
        truncation_side: str = "right",
        split_special_tokens: bool = False,
        name_or_path: str = "",
    ):
        if isinstance(vocab, (str, os.PathLike)):
            vocab = read_json(Path(vocab))
        if isinstance(merges, (str, os.PathLike)):
            merges = _read_merges(Path(merges))
        if padding_side not in ("right", "left") or truncation_side not in ("right", "left"):
            raise ValueError("padding_side and truncation_side must be 'right' or 'left'")

        specials = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "sep_token": sep_token,
            "pad_token": pad_token,
            "cls_token": cls_token,
            "mask_token": mask_token,
        }
        for key in ("bos_token", "eos_token", "unk_token"):
            if specials[key] is None:
                raise ValueError(f"a CLIP tokenizer needs a {key}")

        backend = Tokenizer(
            BPE(
                vocab=dict(vocab),
                merges=[tuple(m) for m in merges],
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix=END_OF_WORD_SUFFIX,
                fuse_unk=False,
                unk_token=str(unk_token),
            )
        )
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()

        # Added tokens, in the order and with the flags transformers gives them: the tokens of
        # added_tokens_decoder by index, then the named special tokens whose content is not among
        # them (strings become special, non-normalized tokens; the last of a content wins).
        decoder_tokens = [tok for _, tok in sorted((added_tokens_decoder or {}).items())]
        known = {str(t) for t in decoder_tokens}
        to_add: list[str | AddedToken] = list(decoder_tokens)
        for value in [*specials.values(), *extra_special_tokens]:
            if value is None:
                continue
            if str(value) not in known and value not in to_add:
                to_add.append(value)
        named = {str(v) for v in specials.values() if v is not None}
        tokens = []
        for tok in to_add:
            if isinstance(tok, str):
                tok = AddedToken(tok, special=True)
            elif not tok.special and str(tok) in named:
                tok.special = True
            tokens.append(tok)
        if tokens:
            backend.add_tokens(tokens)
        if split_special_tokens:
            backend.encode_special_tokens = True

        for idx, tok in (added_tokens_decoder or {}).items():
            got = backend.token_to_id(str(tok))
            if got != int(idx):
                logger.warning("added token %r has id %s, not %s as the config says", str(tok), got, idx)

        self.bos_token = str(bos_token)
        self.eos_token = str(eos_token)
        self.unk_token = str(unk_token)
        self.pad_token = None if pad_token is None else str(pad_token)
        self.bos_token_id = backend.token_to_id(self.bos_token)
        self.eos_token_id = backend.token_to_id(self.eos_token)
        self.unk_token_id = backend.token_to_id(self.unk_token)
        self.pad_token_id = None if pad_token is None else backend.token_to_id(self.pad_token)
        backend.post_processor = processors.RobertaProcessing(
            (self.eos_token, self.eos_token_id), (self.bos_token, self.bos_token_id), trim_offsets=False, add_prefix_space=False
        )
        self.backend = backend
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.name_or_path = name_or_path
        self.all_special_ids = sorted(
            {backend.token_to_id(str(t)) for t in [*specials.values(), *extra_special_tokens] if t is not None}
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **overrides) -> "CLIPTokenizer":
        """Load a tokenizer folder (diffusers ``tokenizer/`` layout). ``overrides`` replace config values."""
        folder = Path(path) / subfolder if subfolder else Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")

        config: dict[str, Any] = {}
        if (folder / TOKENIZER_CONFIG_FILE).is_file():
            config = read_json(folder / TOKENIZER_CONFIG_FILE)

        # vocabulary and merges: tokenizer.json first (as transformers), else vocab.json + merges.txt
        json_added: list[dict] | None = None
        if (folder / TOKENIZER_FILE).is_file():
            tok_json = read_json(folder / TOKENIZER_FILE)
            model = tok_json.get("model", {})
            if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
                raise ValueError(f"{folder / TOKENIZER_FILE} does not hold a BPE model")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            json_added = tok_json.get("added_tokens") or []
        else:
            for name in (VOCAB_FILE, MERGES_FILE):
                if not (folder / name).is_file():
                    raise FileNotFoundError(f"{name} not found in tokenizer folder {folder}")
            vocab = read_json(folder / VOCAB_FILE)
            merges = _read_merges(folder / MERGES_FILE)

        # special tokens and added tokens, with transformers' precedence
        values: dict[str, Any] = {k: config[k] for k in SPECIAL_TOKENS_ATTRIBUTES if k in config}
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        added_decoder: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in config:
            for idx, spec in config["added_tokens_decoder"].items():
                added_decoder[int(idx)] = spec if isinstance(spec, AddedToken) else _added_token(spec)
        else:
            if (folder / SPECIAL_TOKENS_MAP_FILE).is_file():
                for key, value in read_json(folder / SPECIAL_TOKENS_MAP_FILE).items():
                    if key in ("additional_special_tokens", "extra_special_tokens"):
                        if isinstance(value, list):
                            merged = list(extra)
                            for v in value:
                                v = _added_token(v, special=True) if isinstance(v, dict) else v
                                if v not in merged:
                                    merged.append(v)
                            extra = merged
                    elif isinstance(value, dict):
                        values[key] = _added_token({k: v for k, v in value.items() if k != "special"}, special=True)
                    else:
                        values[key] = value
            if (folder / ADDED_TOKENS_FILE).is_file():
                special_contents = {str(_as_token(v)) for v in values.values() if v} | {str(_as_token(v)) for v in extra}
                for content, idx in read_json(folder / ADDED_TOKENS_FILE).items():
                    is_special = content in special_contents
                    added_decoder[int(idx)] = AddedToken(
                        content, rstrip=False, lstrip=False, normalized=not is_special, special=is_special
                    )
            if json_added is not None:
                for spec in json_added:
                    added_decoder[int(spec["id"])] = _added_token(spec)

        by_content = {str(t): t for t in added_decoder.values()}
        kwargs: dict[str, Any] = {}
        for key in SPECIAL_TOKENS_ATTRIBUTES:
            value = _as_token(values.get(key, DEFAULT_SPECIAL_TOKENS.get(key)))
            if value is not None and by_content:
                value = by_content.get(str(value), value)
            kwargs[key] = value
        kwargs["extra_special_tokens"] = [_as_token(v) if isinstance(v, dict) else v for v in extra]
        kwargs["added_tokens_decoder"] = added_decoder
        kwargs["model_max_length"] = config.get("model_max_length") or DEFAULT_MODEL_MAX_LENGTH
        kwargs["padding_side"] = config.get("padding_side", "right")
        kwargs["truncation_side"] = config.get("truncation_side", "right")
        kwargs["split_special_tokens"] = config.get("split_special_tokens", False)
        kwargs["name_or_path"] = str(folder)
        kwargs.update(overrides)
        return cls(vocab, merges, **kwargs)

    # ------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def add_tokens(self, tokens: Sequence[str]) -> int:
        """transformers' ``add_tokens`` for plain (not special) tokens, as textual inversion adds them:
        each gets the next id; returns how many were new."""
        self._added_plain = [*getattr(self, "_added_plain", []), *tokens]
        return self.backend.add_tokens([AddedToken(str(t), special=False, normalized=True) for t in tokens])

    def maybe_convert_prompt(self, prompt: str) -> str:
        """diffusers' ``maybe_convert_prompt``: a multi-vector textual-inversion token in ``prompt``
        becomes ``token token_1 ... token_{n-1}``; without added tokens the prompt is unchanged."""
        added = set(getattr(self, "_added_plain", ()))
        if not added:
            return prompt
        for token in set(self.tokenize(prompt)):
            if token in added:
                replacement, i = token, 1
                while f"{token}_{i}" in added:
                    replacement += f" {token}_{i}"
                    i += 1
                prompt = prompt.replace(token, replacement)
        return prompt

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of ``text`` (no bos/eos)."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            tid = self.backend.token_to_id(tokens)
            return self.unk_token_id if tid is None else tid
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self.backend.id_to_token(int(ids))
        return [self.backend.id_to_token(int(i)) for i in ids]

    @staticmethod
    def _as_list(prompts: str | Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
            return list(prompts)
        raise TypeError("prompts must be a string or a list of strings")

    def encode_untruncated(self, prompts: str | Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, ``[bos, ..., eos]``, neither truncated nor padded."""
        texts = self._as_list(prompts)
        if not texts:
            return []
        return [enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=True)]

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        if len(ids) <= max_length:
            return ids
        if max_length < 2:
            raise ValueError("max_length must leave room for the bos and eos tokens")
        keep = max_length - 2
        body = ids[1:-1]
        body = body[:keep] if self.truncation_side == "right" else body[len(body) - keep :]
        return [ids[0], *body, ids[-1]]

    def pad(self, sequences: Sequence[Sequence[int]], length: int | None = None) -> np.ndarray:
        """Pad id lists with ``pad_token_id`` to ``length`` (default: the longest) -> int64 [B, length]."""
        if length is None:
            length = max((len(s) for s in sequences), default=0)
        if self.pad_token_id is None:
            if any(len(s) != length for s in sequences):
                raise ValueError("this tokenizer has no pad token")
            pad_id = 0
        else:
            pad_id = self.pad_token_id
        out = np.full((len(sequences), length), pad_id, dtype=np.int64)
        for i, seq in enumerate(sequences):
            if len(seq) > length:
                raise ValueError(f"sequence of length {len(seq)} does not fit in {length}")
            if self.padding_side == "right":
                out[i, : len(seq)] = seq
            elif len(seq):
                out[i, length - len(seq) :] = seq
        return out

    def truncated_text(self, prompts: str | Sequence[str], max_length: int | None = None) -> list[str] | None:
        """What diffusers reports as removed by truncation (``None`` when nothing is cut).

        As diffusers: the prompts are padded to the longest one and, for each, the ids from
        ``max_length - 1`` up to the last position are decoded (so shorter prompts of a batch
        that is truncated show padding tokens).
        """
        return self._removed_text(self.encode_untruncated(prompts), max_length or self.model_max_length)

    def _removed_text(self, untruncated: list[list[int]], max_length: int) -> list[str] | None:
        longest = max((len(s) for s in untruncated), default=0)
        if longest <= max_length:
            return None
        padded = self.pad(untruncated, longest)
        return self.batch_decode(padded[:, max_length - 1 : -1])

    def __call__(
        self, prompts: str | Sequence[str], max_length: int | None = None, *, warn: bool = True
    ) -> np.ndarray:
        """Token ids, int64 [B, max_length] (default ``model_max_length``), as
        ``tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids``.

        When a prompt is longer than ``max_length`` tokens, the removed part is reported with one
        logging warning worded as diffusers' (``warn=False`` silences it, e.g. for negative prompts,
        which diffusers does not check).
        """
        max_length = self.model_max_length if max_length is None else int(max_length)
        untruncated = self.encode_untruncated(prompts)
        if warn:
            removed = self._removed_text(untruncated, max_length)
            if removed is not None:
                logger.warning(TRUNCATION_MESSAGE.format(max_length=max_length, removed=removed))
        return self.pad([self._truncate(ids, max_length) for ids in untruncated], max_length)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str | list[str]:
        """Text of a sequence of ids (a list of strings for a 2-D input), as transformers decodes."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        elif isinstance(ids, (int, np.integer)):
            ids = [int(ids)]
        if len(ids) and isinstance(ids[0], (list, tuple, np.ndarray)):
            return self.batch_decode(ids, skip_special_tokens=skip_special_tokens)
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD_SUFFIX, " ").strip()

    def batch_decode(self, sequences: Iterable[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, np.ndarray):
            sequences = sequences.tolist()
        return [self.decode(list(seq), skip_special_tokens=skip_special_tokens) for seq in sequences]

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"model_max_length={self.model_max_length}, pad_token={self.pad_token!r})"
        )


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}: bad merge line {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


__all__ = ["CLIPTokenizer", "TRUNCATION_MESSAGE"]
