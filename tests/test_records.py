"""records.py: one JSONL reader for training data, bench prompts and eval sets."""

import json

import pytest

from .helpers import write_tokenizer
from specstream_mlx.bench.evaluate import _examples
from specstream_mlx.bench.prompts import BenchError, PromptFileError, load_prompts
from specstream_mlx.generate import encode_prompt
from specstream_mlx.records import RecordError, read_records
from specstream_mlx.train.data import DataError, encode_record, load_examples


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    folder = tmp_path_factory.mktemp("plain")
    write_tokenizer(folder, chat_template=False)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """A tokenizer that adds BOS when encoding, with a template that writes none."""
    from mlx_lm.utils import load_tokenizer
    from tokenizers import Tokenizer, processors

    folder = tmp_path_factory.mktemp("bos")
    write_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tok.save(str(folder / "tokenizer.json"))
    return load_tokenizer(folder)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


CONVERSATION = (
    '{"messages": [{"role": "system", "content": "be brief"}, '
    '{"role": "user", "content": "hi there"}, '
    '{"role": "assistant", "content": "the answer"}]}\n'
)


def test_each_kind_is_read_with_its_line(tmp_path):
    path = _write(tmp_path / "data.jsonl",
                  CONVERSATION
                  + '{"prompt": "say a", "completion": "a"}\n'
                  + '{"prompt": "only a prompt"}\n'
                  + "\n"
                  + '{"text": "plain text"}\n'
                  + '{"messages": [{"role": "user", "content": "no reply"}]}\n')
    records = read_records(path)
    assert [(r.kind, r.line) for r in records] == [
        ("messages", 1), ("prompt", 2), ("prompt", 3), ("text", 5), ("messages", 6)]
    conversation, pair, lone, text, open_ended = records
    assert conversation.messages == [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "hi there"}]
    assert conversation.completion == "the answer"
    assert pair.messages == [{"role": "user", "content": "say a"}] and pair.completion == "a"
    assert lone.completion is None
    assert text.text == "plain text" and text.messages is None and text.completion is None
    assert open_ended.messages == [{"role": "user", "content": "no reply"}]
    assert open_ended.completion is None
    assert conversation.where == f"{path}:1"
    assert [r.line for r in read_records(path, limit=2)] == [1, 2]


def test_trailing_assistant_message_is_the_completion_for_all_three_users(tmp_path, tokenizer):
    path = _write(tmp_path / "chat.jsonl", CONVERSATION)
    prompt_text = "<system>be brief\n<user>hi there\n<assistant>"
    expected_prompt = encode_prompt(tokenizer, prompt_text)

    example, = load_examples(path, tokenizer)
    bench, = load_prompts(path, tokenizer, None, 8, None)
    (eval_prompt, (reference,)), = _examples(path, tokenizer, None)

    # One prompt: the messages before the trailing assistant message, with the
    # generation prompt; the same tokens for training, bench and eval.
    assert list(example.tokens[: example.loss_start]) == expected_prompt
    assert bench.tokens == expected_prompt
    assert eval_prompt == prompt_text and encode_prompt(tokenizer, eval_prompt) == expected_prompt
    # The trailing assistant message: training's loss, eval's reference, not in bench's prompt.
    assert tokenizer.decode(list(example.tokens[example.loss_start:])) == "the answer\n"
    assert reference == "the answer"
    assert "the answer" not in tokenizer.decode(bench.tokens)


def test_training_prompt_is_the_generation_prompt_with_its_bos(tmp_path, bos_tokenizer):
    path = _write(tmp_path / "chat.jsonl", CONVERSATION)
    example, = load_examples(path, bos_tokenizer)
    bench, = load_prompts(path, bos_tokenizer, None, 8, None)
    (eval_prompt, _), = _examples(path, bos_tokenizer, None)
    assert bench.tokens[0] == 256 and encode_prompt(bos_tokenizer, eval_prompt) == bench.tokens
    assert list(example.tokens[: example.loss_start]) == bench.tokens
    assert bos_tokenizer.decode(list(example.tokens[example.loss_start:])) == "the answer\n"


def test_prompt_completion_is_a_user_and_an_assistant_message(tmp_path, tokenizer):
    pair = {"prompt": "hi there", "completion": "the answer"}
    chat = {"messages": [{"role": "user", "content": "hi there"},
                         {"role": "assistant", "content": "the answer"}]}
    a, b = encode_record(pair, tokenizer), encode_record(chat, tokenizer)
    assert a == b and tokenizer.decode(list(a.tokens)) == "<user>hi there\n<assistant>the answer\n"
    path = _write(tmp_path / "two.jsonl", json.dumps(pair) + "\n" + json.dumps(chat) + "\n")
    first, second = load_prompts(path, tokenizer, None, 8, None)
    assert first.tokens == second.tokens == list(a.tokens[: a.loss_start])
    assert _examples(path, tokenizer, None) == [("<user>hi there\n<assistant>", ["the answer"])] * 2


def test_without_a_chat_template_the_prompt_is_the_raw_text(tmp_path, plain_tokenizer):
    path = _write(tmp_path / "plain.jsonl", '{"prompt": "hi there", "completion": " done"}\n')
    example, = load_examples(path, plain_tokenizer)
    bench, = load_prompts(path, plain_tokenizer, None, 8, None)
    assert list(example.tokens[: example.loss_start]) == bench.tokens
    assert plain_tokenizer.decode(bench.tokens) == "hi there"
    assert plain_tokenizer.decode(list(example.tokens[example.loss_start:])) == " done"


def test_text_records_train_on_every_token_and_are_bench_prompts(tmp_path, tokenizer):
    path = _write(tmp_path / "text.jsonl", '{"text": "abc abc"}\n')
    example, = load_examples(path, tokenizer)
    assert example.loss_start == 0 and tokenizer.decode(list(example.tokens)) == "abc abc"
    bench, = load_prompts(path, tokenizer, None, 8, None)
    assert tokenizer.decode(bench.tokens) == "<user>abc abc\n<assistant>"
    with pytest.raises(RecordError, match=r"text.jsonl:1: expected \"prompt\" \+ \"completion\""):
        _examples(path, tokenizer, None)


def test_a_record_without_completion_is_a_bench_prompt_only(tmp_path, tokenizer):
    path = _write(tmp_path / "open.jsonl",
                  '{"prompt": "ok", "completion": "fine"}\n'
                  '{"messages": [{"role": "user", "content": "no reply"}]}\n')
    bench = load_prompts(path, tokenizer, None, 8, None)
    assert tokenizer.decode(bench[1].tokens) == "<user>no reply\n<assistant>"
    with pytest.raises(DataError, match=r"open.jsonl:2: \"messages\" ends with a \"user\" message"):
        load_examples(path, tokenizer)
    with pytest.raises(RecordError, match=r"open.jsonl:2: \"messages\" ends with a \"user\""):
        _examples(path, tokenizer, None)
    _write(tmp_path / "open.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"open.jsonl:2: \"prompt\" has no \"completion\""):
        load_examples(path, tokenizer)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"oops": 1}', 'expected a "prompt", "messages" or "text" field'),
    ('{"prompt": 3, "completion": "x"}', '"prompt" must be a non-empty string'),
    ('{"prompt": "  ", "completion": "x"}', '"prompt" must be a non-empty string'),
    ('{"prompt": "p", "completion": 7}', '"completion" must be a string, got int'),
    ('{"text": ["a"]}', '"text" must be a non-empty string'),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": "hi"}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "user", "content": 5}]}', '"messages" must be a non-empty list'),
    ('{"messages": [{"content": "no role"}]}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "only an assistant message"),
])
def test_a_bad_line_names_file_and_line_in_every_user(tmp_path, tokenizer, line, message):
    good = '{"prompt": "ok", "completion": "fine"}\n\n'
    path = _write(tmp_path / "data.jsonl", good + line + "\n" + good)
    where = f"{path}:3: "
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert str(info.value).startswith(where) and message in str(info.value)
    assert (info.value.file.name, info.value.line) == ("data.jsonl", 3)
    with pytest.raises(DataError) as info:
        load_examples(path, tokenizer)
    assert str(info.value).startswith(where) and message in str(info.value)
    with pytest.raises(BenchError) as info:
        load_prompts(path, tokenizer, None, 8, None)
    assert str(info.value).startswith(where) and isinstance(info.value, RecordError)
    with pytest.raises(RecordError) as info:
        _examples(path, tokenizer, None)
    assert str(info.value).startswith(where)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_file_is_one_clear_error(tmp_path, tokenizer, content):
    path = _write(tmp_path / "empty.jsonl", content)
    expected = f"{path} holds no records: write one JSON object per line"
    for read in (lambda: read_records(path), lambda: load_examples(path, tokenizer),
                 lambda: load_prompts(path, tokenizer, None, 8, None),
                 lambda: _examples(path, tokenizer, None)):
        with pytest.raises(RecordError) as info:
            read()
        assert str(info.value).startswith(expected)


def test_missing_paths_and_folders(tmp_path, tokenizer):
    with pytest.raises(RecordError, match="nope.jsonl does not exist: give a JSONL file"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(RecordError, match="is a folder: give a JSONL file"):
        load_prompts(str(tmp_path), tokenizer, None, 8, None)
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(DataError, match=r"holds no \*\.jsonl files"):
        load_examples(str(folder), tokenizer)
    _write(folder / "train.jsonl", '{"prompt": "a", "completion": "train"}\n')
    _write(folder / "valid.jsonl", '{"prompt": "a", "completion": "valid"}\n')
    assert [r.completion for r in read_records(str(folder), "valid")] == ["valid"]
    assert [r.completion for r in read_records(str(folder), "train")] == ["train"]
    assert [r.completion for r in read_records(str(folder), "test")] == ["train", "valid"]


def test_error_types_keep_old_callers_working():
    assert DataError is RecordError and issubclass(RecordError, ValueError)
    assert issubclass(PromptFileError, BenchError) and issubclass(PromptFileError, RecordError)
    assert not issubclass(BenchError, RecordError)  # bench's option errors name no file


def test_references_are_read_for_eval_and_checked(tmp_path, tokenizer):
    from specstream_mlx.bench.evaluate import _examples

    path = _write(tmp_path / "refs.jsonl",
                  '{"prompt": "hi there", "completion": "one", "references": ["one", "two"]}\n'
                  '{"prompt": "hi there", "completion": "alone"}\n'
                  '{"messages": [{"role": "user", "content": "hi there"}, '
                  '{"role": "assistant", "content": "x"}], "references": ["x", "y", "z"]}\n')
    multi, single, chat = read_records(path, need_completion=True)
    assert multi.references == ["one", "two"] and multi.completion == "one"
    assert single.references is None
    assert chat.references == ["x", "y", "z"] and chat.completion == "x"
    # eval scores against every reference; training and bench keep the completion
    assert _examples(path, tokenizer, None) == [
        ("<user>hi there\n<assistant>", ["one", "two"]),
        ("<user>hi there\n<assistant>", ["alone"]),
        ("<user>hi there\n<assistant>", ["x", "y", "z"])]
    # the completion (training's target, bench's left-out answer) stays the first reference
    assert [r.completion for r in read_records(str(path), need_completion=True)] == [
        "one", "alone", "x"]
    assert [r.completion for r in read_records(path)] == ["one", "alone", "x"]


@pytest.mark.parametrize("references", ['[]', '"one"', '["one", 2]', '{"a": "b"}'])
def test_bad_references_name_file_and_line(tmp_path, references):
    path = _write(tmp_path / "bad.jsonl",
                  '{"prompt": "a", "completion": "b"}\n'
                  f'{{"prompt": "a", "completion": "b", "references": {references}}}\n')
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}:2: \"references\" must be a non-empty list")
    assert info.value.line == 2


def test_token_records_are_training_data_only(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"tokens": [4, 5, 6], "loss_start": 2}) + "\n")
    record = read_records(str(path), allow_tokens=True)[0]
    assert (record.kind, record.tokens, record.loss_start) == ("tokens", (4, 5, 6), 2)
    with pytest.raises(RecordError, match=r"corpus.jsonl:1: .*training data"):
        read_records(str(path))  # bench and eval read without allow_tokens
    path.write_text(json.dumps({"tokens": [4, True], "loss_start": 1}) + "\n")
    with pytest.raises(RecordError, match="token ids"):
        read_records(str(path), allow_tokens=True)
