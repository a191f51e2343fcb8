"""Guided decoding's front half: a request's guide checked and compiled, before its rows reach
the engine.

A guide (`predictor.params.Guide`: a JSON schema, a regex, a list of choices or an EBNF
grammar) becomes an xgrammar grammar compiled for the checkpoint's vocabulary. Why here, on the
front's image-worker threads: compiling a 4-field schema for Qwen's 151,936 tokens takes tens
of milliseconds and a pathological one seconds, and the decode loop must never wait for one.
The engine only runs matchers over compiled grammars (`predictor.engine.grammar`).

- **Cache**: compiled guides are kept by content (kind and text), least recently used first
  out, bounded by count and by memory; concurrent requests for one new guide compile it once.
- **Limits**: a guide over `--max_guide_bytes` is refused before it is parsed; a compile that
  runs past `--guide_compile_timeout_s` is refused (400) and remembered, so the same guide is
  refused at once next time. Its thread finishes in the background (xgrammar cannot be
  interrupted; it releases the GIL meanwhile), on a pool of two, so runaway compiles hold at
  most two threads; a request that finds both busy past its limit gets 503 (retry).
- **What a schema may use**: JSON Schema keywords that xgrammar would silently ignore (`not`,
  `if`/`then`/`else`, `contains`, `uniqueItems`, `dependentRequired`, a `multipleOf` on a
  non-integer, `allOf` of several schemas, a remote `$ref`) are refused, naming the keyword:
  an output that stops must validate against the schema as sent. `oneOf` is enforced as
  `anyOf`. JSON is generated compactly (`", "` and `": "` separators, no free whitespace), so a
  small model cannot spend its token budget on whitespace.
- **The vocabulary xgrammar sees**: every token as the bytes it decodes to, and special tokens
  (the chat template's markers, image pads, the stop tokens) as nothing, so no grammar can
  emit one as text and the text the grammar matched is the text the client gets (decoding
  skips special tokens). Stop tokens end the output once the grammar allows it to end. For
  JSON schemas, tokens holding a control character (bytes below 0x20) are nothing too:
  compact JSON never contains one raw, and xgrammar 0.2.9's rule for strings with a
  `minLength` / `maxLength` would let one through, which `json.loads` refuses.
- **Across the process boundary**: a `CompiledGuide` pickles as xgrammar's serialised form
  (about 44 KB for a 4-field schema, once per request: its rows share it), and the engine
  process turns it back into a grammar with `resolve`, cached by content too (0.8 ms to read,
  against tens of ms to compile).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from predictor.errors import InvalidRequest, Unavailable
from predictor.params import Guide

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT_S = 2.0
CACHE_ENTRIES = 256
CACHE_BYTES = 256 * 1024 * 1024
COMPILE_WORKERS = 2
COMPILE_THREADS = 2  # xgrammar's own threads for one compile (its token-mask cache)
MAX_SCHEMA_DEPTH = 32
# Keywords xgrammar 0.2 accepts but does not enforce: refused, so every output validates.
UNSUPPORTED_KEYWORDS = (
    "not",
    "if",
    "then",
    "else",
    "contains",
    "minContains",
    "maxContains",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "unevaluatedItems",
    "$dynamicRef",
    "$recursiveRef",
)
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMAS = (
    "items",
    "additionalItems",
    "additionalProperties",
    "unevaluatedProperties",
    "propertyNames",
)
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: ".
_NATIVE_PREFIX = re.compile(r"^\[[0-9:]+\] [^:]+:\d+: (Check failed: \([^)]*\) is false: )?")
_KIND_NAMES = {
    "json_schema": "JSON schema",
    "regex": "regex",
    "choice": "choice list",
    "ebnf": "EBNF grammar",
}


class _Refused(Exception):
    """A guide that cannot be compiled; the message says why (without the field)."""


class CompiledGuide:
    """A guide compiled for the checkpoint's vocabulary. Pickles as xgrammar's serialised
    form; on the other side `GuideCompiler.resolve` gives it its grammar back."""

    def __init__(self, key: tuple[str, str], grammar: Any, serialized: str | None = None):
        self.key = key
        self.grammar = grammar  # xgrammar.CompiledGrammar, or None until resolved
        self._serialized = serialized

    @property
    def serialized(self) -> str:
        if self._serialized is None:
            self._serialized = self.grammar.serialize_json()
        return self._serialized

    @property
    def memory_bytes(self) -> int:
        return int(self.grammar.memory_size_bytes) if self.grammar is not None else 0

    def __getstate__(self) -> dict[str, Any]:
        return {"key": self.key, "serialized": self.serialized}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.key = tuple(state["key"])
        self.grammar = None
        self._serialized = state["serialized"]

    def __repr__(self) -> str:
        return f"CompiledGuide({self.key[0]}, {len(self.key[1])} chars)"


def tokenizer_info(tokenizer: Any, vocab_size: int) -> dict[bool, Any]:
    """xgrammar's views of the vocabulary, for text grammars (False) and for JSON (True):
    each token as the bytes it decodes to, special tokens as nothing (never emitted as
    text), and for JSON also every token with a control character; the tokenizer's end
    tokens as stop tokens.

    Built the same way from the same files in the front and in the engine process, as
    xgrammar's serialised grammars require (it checks the vocabulary's metadata)."""
    import xgrammar

    base = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    vocabulary = list(base.decoded_vocab)
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    for index in special:
        if index < len(vocabulary):
            vocabulary[index] = b""
    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    stops = sorted(i for i in ends if isinstance(i, int) and i in special)
    controls = bytes(range(32))
    json_vocabulary = [
        b"" if token.translate(None, controls) != token else token for token in vocabulary
    ]
    return {
        for_json: xgrammar.TokenizerInfo(
            tokens, xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops
        )
        for for_json, tokens in ((False, vocabulary), (True, json_vocabulary))
    }


class GuideCompiler:
    """Compiles guides (front) and resolves compiled ones (engine process). Thread-safe.

    The vocabulary's xgrammar form is built on first use (about a second for Qwen's), so a
    server that never sees a guide never pays for it."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
        cache_entries: int = CACHE_ENTRIES,
        cache_bytes: int = CACHE_BYTES,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        # Re-entrant: a compile that ends at once runs its done-callback in the caller.
        self._lock = threading.RLock()
        self._setup_lock = threading.Lock()
        self._infos: dict[bool, Any] = {}  # `tokenizer_info`'s, by "for JSON"
        self._compilers: dict[bool, Any] = {}
        self._cache: OrderedDict[tuple[str, str], CompiledGuide] = OrderedDict()
        self._cached_bytes = 0
        self._refused: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._inflight: dict[tuple[str, str], Future] = {}
        self._started: dict[tuple[str, str], float] = {}
        self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="guide-compile")

    # ---- the front: compile --------------------------------------------------------------

    def compile(self, guide: Guide) -> CompiledGuide:
        """The compiled guide, from the cache or compiled now (blocks: call it off the event
        loop). InvalidRequest naming `guide.field` if it cannot be compiled in time."""
        self._setup()
        key = guide.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            refused = self._refused.get(key)
            if refused is not None:
                raise InvalidRequest(guide.field, refused)
            future = self._inflight.get(key)
            if future is None:
                future = self._pool.submit(self._build, guide)
                self._inflight[key] = future
                future.add_done_callback(lambda done: self._settle(key, done))
        try:
            return future.result(timeout=self.timeout_s)
        except futures.TimeoutError:  # the builtin one from Python 3.11
            with self._lock:
                started = key in self._started
            if not started:
                raise Unavailable(
                    "the guide compiler is busy with other guides; retry after 1 s"
                ) from None
            raise InvalidRequest(guide.field, self._too_slow()) from None
        except _Refused as refused:
            raise InvalidRequest(guide.field, str(refused)) from None

    def _too_slow(self) -> str:
        return (
            f"did not compile within {self.timeout_s:g} s (--guide_compile_timeout_s); "
            "simplify it (fewer or smaller repetitions and alternatives)"
        )

    def _build(self, guide: Guide) -> CompiledGuide:
        key = guide.key
        started = time.monotonic()
        with self._lock:
            self._started[key] = started
        grammar = self._compile(guide)
        elapsed = time.monotonic() - started
        if elapsed > self.timeout_s:
            raise _Refused(self._too_slow())
        logger.info("compiled a %s in %.0f ms", _KIND_NAMES[guide.kind], elapsed * 1000)
        return CompiledGuide(key, grammar)

    def _compile(self, guide: Guide) -> Any:
        """xgrammar's compiled grammar for `guide`; `_Refused` with the reason otherwise."""
        what = _KIND_NAMES.get(guide.kind)
        if what is None:
            raise _Refused(f"unknown guide kind {guide.kind!r}")
        compiler = self._compilers[guide.kind == "json_schema"]
        try:
            if guide.kind == "json_schema":
                check_schema(guide.text)
                return compiler.compile_json_schema(
                    guide.text, any_whitespace=False, strict_mode=True
                )
            if guide.kind == "regex":
                return compiler.compile_regex(guide.text)
            if guide.kind == "choice":
                return compiler.compile_grammar(choice_grammar(guide.text))
            return compiler.compile_grammar(guide.text, root_rule_name="root")
        except _Refused:
            raise
        except Exception as error:  # xgrammar's parse errors: the guide's fault
            raise _Refused(f"is not a valid {what}: {_native_message(error)}") from None

    def _settle(self, key: tuple[str, str], done: Future) -> None:
        """A compile ended: cache its grammar, or remember why it was refused."""
        with self._lock:
            self._inflight.pop(key, None)
            self._started.pop(key, None)
            error = done.exception()
            if isinstance(error, _Refused):
                self._refused[key] = str(error)
                while len(self._refused) > self.cache_entries:
                    self._refused.popitem(last=False)
            elif error is None:
                self._remember(done.result())
            else:  # not the guide's fault: let the next request try again
                logger.error("compiling a guide failed: %s", error)

    def _remember(self, compiled: CompiledGuide) -> None:
        """Add to the cache (lock held), evicting the least recently used past its bounds."""
        self._cache[compiled.key] = compiled
        self._cached_bytes += compiled.memory_bytes
        while self._cache and (
            len(self._cache) > self.cache_entries or self._cached_bytes > self.cache_bytes
        ):
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.memory_bytes

    # ---- the engine process: resolve -----------------------------------------------------

    def resolve(self, compiled: CompiledGuide) -> CompiledGuide:
        """A guide that crossed the pipe (`grammar` None), with its grammar: from the cache,
        or read from its serialised form. One that has its grammar is returned as it is."""
        if compiled.grammar is not None:
            return compiled
        self._setup()
        with self._lock:
            hit = self._cache.get(compiled.key)
            if hit is not None:
                self._cache.move_to_end(compiled.key)
                return hit
        import xgrammar

        info = self._infos[compiled.key[0] == "json_schema"]
        grammar = xgrammar.CompiledGrammar.deserialize_json(compiled.serialized, info)
        resolved = CompiledGuide(compiled.key, grammar, compiled.serialized)
        with self._lock:
            self._remember(resolved)
        return resolved

    # ---- both ----------------------------------------------------------------------------

    def _setup(self) -> None:
        if self._compilers:
            return
        with self._setup_lock:
            if self._compilers:
                return
            import xgrammar

            started = time.monotonic()
            infos = tokenizer_info(self.tokenizer, self.vocab_size)
            self._infos = infos
            self._compilers = {
                kind: xgrammar.GrammarCompiler(
                    info, max_threads=COMPILE_THREADS, cache_enabled=False
                )
                for kind, info in infos.items()
            }
            logger.info(
                "guided decoding ready for %d tokens in %.0f ms",
                self.vocab_size,
                (time.monotonic() - started) * 1000,
            )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def choice_grammar(text: str) -> str:
    """An EBNF grammar for exactly one of the choices (a JSON list of strings)."""
    choices = json.loads(text)
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def check_schema(text: str) -> None:
    """Refuse (`_Refused`) a schema that is not JSON, not a schema, or uses a keyword xgrammar
    would not enforce."""
    try:
        schema = json.loads(text)
    except RecursionError:
        raise _Refused(f"nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValueError as error:
        raise _Refused(f"is not valid JSON ({error})") from None
    _check_subschema(schema, "", 0)


def _check_subschema(schema: Any, where: str, depth: int) -> None:
    at = f" (at {where})" if where else ""
    if depth > MAX_SCHEMA_DEPTH:
        raise _Refused(f"nests deeper than {MAX_SCHEMA_DEPTH} levels{at}")
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise _Refused(f"must be a JSON Schema object or boolean{at}, got {json.dumps(schema)}")
    for keyword in UNSUPPORTED_KEYWORDS:
        if keyword in schema:
            raise _Refused(f"uses '{keyword}'{at}, which guided decoding does not support")
    if schema.get("uniqueItems") is True:
        raise _Refused(f"uses 'uniqueItems'{at}, which guided decoding does not support")
    if "multipleOf" in schema and schema.get("type") != "integer":
        raise _Refused(f"uses 'multipleOf'{at}, which guided decoding supports for integers only")
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        raise _Refused(f"refers to {ref!r}{at}: only references within the schema (#/...) work")
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        raise _Refused(f"uses 'allOf' of several schemas{at}, which guided decoding cannot merge")
    prefix = f"{where}." if where else ""
    for keyword in _SUBSCHEMA_MAPS:
        children = schema.get(keyword)
        if isinstance(children, dict):
            for name, child in children.items():
                _check_subschema(child, f"{prefix}{keyword}.{name}", depth + 1)
    for keyword in _SUBSCHEMAS:
        child = schema.get(keyword)
        if isinstance(child, list):  # items as a tuple, in drafts before 2020-12
            for index, item in enumerate(child):
                _check_subschema(item, f"{prefix}{keyword}.{index}", depth + 1)
        elif child is not None:
            _check_subschema(child, f"{prefix}{keyword}", depth + 1)
    for keyword in _SUBSCHEMA_LISTS:
        children = schema.get(keyword)
        if isinstance(children, list):
            for index, child in enumerate(children):
                _check_subschema(child, f"{prefix}{keyword}.{index}", depth + 1)


def _native_message(error: Exception) -> str:
    """xgrammar's message without its source-file prefix, on one line, bounded."""
    text = " ".join(str(error).split())
    return _NATIVE_PREFIX.sub("", text)[:300] or type(error).__name__
