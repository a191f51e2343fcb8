"""Guided decoding without a server: parsing the v2 guide parameters, compiling guides (errors
naming the field, the cache, the compile-time limit, the unsupported schema keywords), the
guide crossing to the engine process, and the logit mask against xgrammar's own."""

from __future__ import annotations

import base64
import json
import pickle
import time
from pathlib import Path

import pytest
import torch
import xgrammar
from transformers import AutoTokenizer

from predictor.engine import grammar
from predictor.errors import InvalidRequest
from predictor.inputs.guides import GuideCompiler, check_schema, tokenizer_info
from predictor.params import (
    ANY_JSON_SCHEMA,
    Guide,
    PixelBudget,
    RequestLimits,
    parse_generation_params,
    parse_guide,
)

VOCAB = 151936  # the tiny checkpoints' logits, as Qwen's
LIMITS = RequestLimits(
    max_new_tokens=16,
    max_new_tokens_limit=64,
    default_budget=PixelBudget(4096, 100_000),
    max_pixels_limit=100_000,
    max_images_per_request=4,
    max_guide_bytes=1000,
)
SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["caption", "count"],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3_vl: Path):
    return AutoTokenizer.from_pretrained(tiny_qwen3_vl)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GuideCompiler:
    guides = GuideCompiler(tokenizer, VOCAB)
    yield guides
    guides.close()


def field_of(call) -> str:
    with pytest.raises(InvalidRequest) as refused:
        call()
    return refused.value.field


# ---- parameters ------------------------------------------------------------------------


def test_v2_guide_parameters_become_a_guide() -> None:
    assert parse_guide(None, None) is None
    assert parse_guide("regex", "[a-z]+") == Guide("regex", "[a-z]+")
    assert parse_guide("ebnf_grammar", 'root ::= "a"').kind == "ebnf"
    assert parse_guide("json", None) == Guide("json_schema", ANY_JSON_SCHEMA)
    sampling, _ = parse_generation_params(
        {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": "{}"}, LIMITS
    )
    assert sampling.guide == Guide("json_schema", "{}")


@pytest.mark.parametrize(
    ("guide_type", "guide", "field"),
    [
        (None, "[a-z]+", "guided_decoding_guide_type"),  # a guide without a type
        ("xml", "x", "guided_decoding_guide_type"),
        (3, "x", "guided_decoding_guide_type"),
        ("regex", None, "guided_decoding_guide"),
        ("regex", "", "guided_decoding_guide"),
        ("json", "{}", "guided_decoding_guide"),  # json takes no guide
        ("regex", "a" * 1001, "guided_decoding_guide"),  # over --max_guide_bytes
    ],
)
def test_bad_v2_guide_parameters_name_the_field(guide_type, guide, field: str) -> None:
    params = {"guided_decoding_guide_type": guide_type, "guided_decoding_guide": guide}
    params = {k: v for k, v in params.items() if v is not None}
    assert field_of(lambda: parse_generation_params(params, LIMITS)) == field


def test_a_guide_cannot_be_combined_with_a_fixed_length() -> None:
    guide = {"guided_decoding_guide_type": "regex", "guided_decoding_guide": "a+"}
    assert field_of(lambda: parse_generation_params({**guide, "min_new_tokens": 2}, LIMITS)) == (
        "min_new_tokens"
    )
    assert field_of(lambda: parse_generation_params({**guide, "ignore_eos": True}, LIMITS)) == (
        "ignore_eos"
    )


def test_a_choice_list_must_hold_non_empty_strings() -> None:
    assert json.loads(Guide.choice(["a", 'b "c"'], "f").text) == ["a", 'b "c"']
    assert field_of(lambda: Guide.choice([], "structured_outputs.choice")) == (
        "structured_outputs.choice"
    )
    assert field_of(lambda: Guide.choice(["a", ""], "f")) == "f"


# ---- compiling -------------------------------------------------------------------------


def test_each_kind_compiles_and_the_cache_returns_the_same_grammar(
    compiler: GuideCompiler,
) -> None:
    guides = [
        Guide("json_schema", json.dumps(SCHEMA)),
        Guide("regex", r"(cat|dog)s? [0-9]{1,3}"),
        Guide.choice(["red", "green", 'a "quoted" one'], "choice"),
        Guide("ebnf", 'root ::= "yes" | "no"'),
    ]
    for guide in guides:
        compiled = compiler.compile(guide)
        assert compiled.grammar is not None and compiled.key == guide.key
        assert compiler.compile(Guide(guide.kind, guide.text)) is compiled  # by content


@pytest.mark.parametrize(
    ("kind", "text", "says"),
    [
        ("regex", "(ab", "is not a valid regex"),
        ("ebnf", "root ::= foo", "is not a valid EBNF grammar"),
        ("json_schema", "{bad", "is not valid JSON"),
        ("json_schema", '{"type": "foo"}', 'Unsupported type "foo"'),
        ("json_schema", "[]", "must be a JSON Schema object or boolean"),
        ("json_schema", '{"not": {"type": "string"}}', "uses 'not'"),
        ("json_schema", '{"properties": {"a": {"if": {}}}}', "(at properties.a)"),
        ("json_schema", '{"type": "array", "uniqueItems": true}', "uniqueItems"),
        ("json_schema", '{"type": "number", "multipleOf": 0.5}', "integers only"),
        ("json_schema", '{"$ref": "https://example.com/s.json"}', "only references within"),
        ("json_schema", '{"allOf": [{"type": "object"}, {"required": ["a"]}]}', "allOf"),
        ("json_schema", '{"items": ' * 40 + "{}" + "}" * 40, "nests deeper than 32"),
    ],
)
def test_a_guide_that_does_not_compile_is_refused_naming_its_field(
    compiler: GuideCompiler, kind: str, text: str, says: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        compiler.compile(Guide(kind, text, "response_format.json_schema.schema"))
    assert refused.value.field == "response_format.json_schema.schema"
    assert says in str(refused.value)
    assert "\n" not in str(refused.value) and ".cc:" not in str(refused.value)


def test_a_compile_past_its_limit_is_refused_and_remembered(
    compiler: GuideCompiler, tokenizer
) -> None:
    compiler.compile(Guide("regex", "warm"))  # builds the vocabulary's form once, shared
    hasty = GuideCompiler(tokenizer, VOCAB, timeout_s=0.05)
    hasty._infos, hasty._compilers = compiler._infos, compiler._compilers
    slow = Guide("regex", ".{1,48}", "guided_decoding_guide")  # about 0.75 s here
    with pytest.raises(InvalidRequest, match=r"did not compile within 0\.05 s"):
        hasty.compile(slow)
    # The compile finishes in the background and is refused from then on, at once.
    deadline = time.monotonic() + 120
    while slow.key not in hasty._refused and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match="did not compile within"):
        hasty.compile(slow)
    assert time.monotonic() - started < 0.05
    hasty.close()


def test_check_schema_accepts_what_pydantic_writes() -> None:
    from pydantic import BaseModel, Field

    class Tag(BaseModel):
        name: str
        score: float = Field(ge=0, le=1)

    class Caption(BaseModel):
        caption: str = Field(max_length=80)
        tags: list[Tag] = Field(max_length=3)
        kind: str | None = None

    check_schema(json.dumps(Caption.model_json_schema()))


# ---- the vocabulary and the process boundary -------------------------------------------


def test_no_guide_can_emit_a_special_token_as_text(compiler: GuideCompiler, tokenizer) -> None:
    infos = tokenizer_info(tokenizer, VOCAB)
    assert infos[False].vocab_size == infos[True].vocab_size == VOCAB
    # ".{1,16}" matches "<|im_end|>" as text, were the special tokens text.
    matcher = xgrammar.GrammarMatcher(compiler.compile(Guide("regex", ".{1,16}")).grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)
    matcher.fill_next_token_bitmask(bitmask)
    allowed = grammar.penalties(bitmask, VOCAB, torch.float32, torch.device("cpu"))[0] == 0
    for token in ("<|im_end|>", "<|im_start|>", "<|vision_pad|>", "<|endoftext|>"):
        assert not allowed[tokenizer.convert_tokens_to_ids(token)], token
    assert allowed[tokenizer.convert_tokens_to_ids("a")]
    assert not matcher.accept_token(tokenizer.convert_tokens_to_ids("<|im_end|>"))


def test_json_strings_hold_no_raw_control_character(compiler: GuideCompiler, tokenizer) -> None:
    # xgrammar 0.2.9 writes a length-bounded string's characters as [^"\\\r\n], which would
    # let "\x1f" through and make the JSON unparseable; JSON's vocabulary has no such token.
    control = tokenizer.convert_tokens_to_ids("ğ")  # byte-level BPE's 0x1f
    assert tokenizer.decode([control]) == "\x1f"
    for schema in ({"type": "string", "maxLength": 10}, {"type": "string", "minLength": 1}):
        compiled = compiler.compile(Guide("json_schema", json.dumps(schema)))
        matcher = xgrammar.GrammarMatcher(compiled.grammar)
        assert matcher.accept_token(tokenizer.convert_tokens_to_ids('"'))
        assert not matcher.accept_token(control)
    text = compiler.compile(Guide("regex", r"[\x10-\x7f]"))  # other guides keep them
    assert xgrammar.GrammarMatcher(text.grammar).accept_token(control)


def test_a_compiled_guide_crosses_the_pipe_as_its_serialised_form(
    compiler: GuideCompiler, tokenizer
) -> None:
    compiled = compiler.compile(Guide("json_schema", '{"type": "integer"}'))
    crossed = pickle.loads(pickle.dumps(compiled))
    assert crossed.grammar is None and crossed.key == compiled.key
    other_side = GuideCompiler(tokenizer, VOCAB)  # the engine process's
    resolved = other_side.resolve(crossed)
    assert other_side.resolve(pickle.loads(pickle.dumps(compiled))) is resolved  # cached
    matcher = xgrammar.GrammarMatcher(resolved.grammar)
    for token in tokenizer.encode("123", add_special_tokens=False):
        assert matcher.accept_token(token)
    assert matcher.is_completed()
    other_side.close()


# ---- the mask --------------------------------------------------------------------------


def test_the_mask_is_xgrammar_s_own() -> None:
    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, (VOCAB + 31) // 32), dtype=torch.int32)
    logits = torch.randn((5, VOCAB), generator=generator)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask, backend="torch_native")
    ours = logits + grammar.penalties(bitmask, VOCAB, torch.float32, logits.device)
    assert torch.equal(ours, expected)
    bf16 = logits.bfloat16()
    assert torch.equal(
        torch.isinf(bf16 + grammar.penalties(bitmask, VOCAB, torch.bfloat16, logits.device)),
        torch.isinf(expected),
    )


class _Member:
    def __init__(self, constraint):
        self.constraint = constraint


def test_free_rows_are_left_alone(compiler: GuideCompiler) -> None:
    logits = torch.randn((3, VOCAB))
    before = logits.clone()
    assert grammar.mask([_Member(None)] * 3, logits) is logits and torch.equal(logits, before)
    constraint = grammar.Constraint(compiler.compile(Guide("regex", "[0-9]")), [151645])
    masked = grammar.mask([_Member(None), _Member(constraint), _Member(None)], logits)
    assert torch.equal(logits, before)  # the model's output is never written
    assert torch.equal(masked[0], before[0]) and torch.equal(masked[2], before[2])
    assert int(torch.isfinite(masked[1]).sum()) == 10  # the digits' tokens
    everyone = grammar.mask([_Member(constraint)] * 3, logits)
    assert torch.equal(logits, before) and int(torch.isfinite(everyone).sum()) == 30


# ---- the v2 request: parameters or TensorRT-LLM's inputs -------------------------------


def v2_request(*inputs, parameters: dict | None = None):
    from kserve.protocol.infer_type import InferInput, InferRequest

    image = InferInput("image", [1], "BYTES", [base64.b64encode(b"\xff\xd8x").decode()])
    extra = [InferInput(name, [len(data)], "BYTES", data) for name, data in inputs]
    return InferRequest("qwen-vl", [image, *extra], parameters=parameters)


def test_the_guide_may_come_as_inputs_or_as_parameters() -> None:
    from predictor.protocol import parse_infer_request

    as_inputs = v2_request(
        ("guided_decoding_guide_type", ["regex"]), ("guided_decoding_guide", [b"[0-9]+"])
    )
    as_parameters = v2_request(
        parameters={"guided_decoding_guide_type": "regex", "guided_decoding_guide": "[0-9]+"}
    )
    for request in (as_inputs, as_parameters):
        parsed = parse_infer_request(request, LIMITS, "Describe.")
        assert parsed.sampling.guide == Guide("regex", "[0-9]+")


@pytest.mark.parametrize(
    ("inputs", "parameters", "field"),
    [
        ([("guided_decoding_guide_type", ["regex", "regex"])], None, "guided_decoding_guide_type"),
        ([("guided_decoding_guide", ["a+"])], None, "guided_decoding_guide_type"),
        (
            [("guided_decoding_guide_type", ["regex"])],
            {"guided_decoding_guide_type": "regex"},
            "guided_decoding_guide_type",  # given twice
        ),
        ([("guided_decoding_guide", [b"\xff"])], {"guided_decoding_guide_type": "regex"}, None),
    ],
)
def test_bad_guide_inputs_name_the_field(inputs, parameters, field) -> None:
    from predictor.protocol import parse_infer_request

    with pytest.raises(InvalidRequest) as refused:
        parse_infer_request(v2_request(*inputs, parameters=parameters), LIMITS, "Describe.")
    assert refused.value.field == (field or "guided_decoding_guide")


def test_cached_penalty_rows_give_what_building_them_gives(
    compiler: GuideCompiler, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grammar, "PENALTY_ROWS", 2)  # float64 below: a cache of its own
    guides = [Guide("regex", "[0-9]+"), Guide("regex", "[a-c]+"), Guide.choice(["x", "y"], "c")]
    compiled = [compiler.compile(guide) for guide in guides]

    def members(*which: int | None) -> list[_Member]:
        return [
            _Member(None if w is None else grammar.Constraint(compiled[w], [151645])) for w in which
        ]

    def expected(batch: list[_Member], logits: torch.Tensor) -> torch.Tensor:
        bitmask = xgrammar.allocate_token_bitmask(len(batch), VOCAB)  # -1: everything allowed
        for k, member in enumerate(batch):
            if member.constraint is not None:
                member.constraint.matcher.fill_next_token_bitmask(bitmask, k)
        return logits + grammar.penalties(bitmask, VOCAB, logits.dtype, logits.device)

    logits = torch.randn((4, VOCAB), dtype=torch.float64)
    for batch in (
        members(0, 1, 2, None),  # three masks: more than the cache holds
        members(0, None, 1, 1),
        members(2, 2, 2, 2),  # evicts the oldest; one mask for all, broadcast
        members(0, 2, None, 0),
    ):
        assert torch.equal(grammar.mask(batch, logits), expected(batch, logits))
