"""Tests for synthetic_tasks: hand-written prompts, the checker against every generated answer, its
rejection of near misses, reproducible sampling, bad settings."""

import pytest

from synthetic_tasks import END, TASKS, AdditionTask, CopyTask, Example, KeyValueTask, ReverseTask, make_task


@pytest.mark.parametrize("task, prompt, answer", [
    (CopyTask(), "copy:abc=", "abc"),
    (ReverseTask(), "reverse:abc=", "cba"),
    (AdditionTask(), "12+345=", "357"),
    (AdditionTask(), "999+1=", "1000"),
    (KeyValueTask(), "ab:xy,cd:uv|cd=", "uv"),
])
def test_hand_written_prompts(task, prompt, answer):
    assert task.solve(prompt) == answer
    assert task.check(prompt, answer + END + "anything after the end marker")
    assert task.check(prompt, answer)
    assert not task.check(prompt, answer + "x")
    assert not task.check(prompt, answer[:-1])


@pytest.mark.parametrize("name", list(TASKS))
def test_every_generated_answer_passes_the_checker(name):
    task = make_task(name)
    examples = task.examples(300, seed=1)
    assert all(task.check(e.prompt, e.answer) for e in examples)
    assert all(e.text == e.prompt + e.answer + END for e in examples)
    assert task.accuracy([e.prompt for e in examples], [e.answer for e in examples]) == 1.0
    assert task.accuracy([e.prompt for e in examples], ["" for _ in examples]) < 0.05


def test_addition_answers_equal_python_arithmetic():
    for example in AdditionTask(max_digits=5).examples(500, seed=2):
        a, b = example.prompt[:-1].split("+")
        assert int(example.answer) == int(a) + int(b)
        assert len(a) <= 5 and len(b) <= 5


def test_lookup_keys_distinct_and_query_present():
    for example in KeyValueTask(num_pairs=8, key_length=1, alphabet="abcdefgh").examples(100, seed=3):
        pairs, query = example.prompt[:-1].split("|")
        keys = [p.split(":")[0] for p in pairs.split(",")]
        assert sorted(keys) == list("abcdefgh") and query in keys


@pytest.mark.parametrize("name", list(TASKS))
def test_examples_are_seeded(name):
    task = make_task(name)
    assert task.examples(20, seed=5) == task.examples(20, seed=5)
    assert task.examples(20, seed=5) != task.examples(20, seed=6)


def test_reverse_of_copy_lengths():
    task = ReverseTask(min_length=3, max_length=3, alphabet="ab")
    assert all(len(e.answer) == 3 for e in task.examples(20))
    assert Example("p", "a").text == "pa" + END


@pytest.mark.parametrize("build, name", [
    (lambda: CopyTask(min_length=0), "min_length"),
    (lambda: CopyTask(min_length=5, max_length=2), "max_length"),
    (lambda: CopyTask(alphabet="ab="), "alphabet"),
    (lambda: AdditionTask(max_digits=0), "max_digits"),
    (lambda: KeyValueTask(num_pairs=5, key_length=1, alphabet="abcd"), "num_pairs"),
    (lambda: KeyValueTask(value_length=0), "value_length"),
    (lambda: make_task("sort"), "name"),
    (lambda: CopyTask().examples(-1), "count"),
    (lambda: CopyTask().solve("abc"), "prompt"),
    (lambda: AdditionTask().solve("1-2="), "prompt"),
    (lambda: KeyValueTask().solve("ab:cd|ef="), "query"),
    (lambda: CopyTask().accuracy(["copy:a="], []), "prompts"),
])
def test_bad_arguments_raise_value_error_naming_them(build, name):
    with pytest.raises(ValueError, match=name):
        build()
