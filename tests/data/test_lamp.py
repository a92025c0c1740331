"""LaMP data in both layouts, and a specific MTAError for every kind of bad file."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.data.lamp import Query, User, find_user, load_users, predictions_file, read_predictions, require_profile
from mta.io import MTAError
from mta.tasks import get_task

LAMP2 = get_task("LaMP-2")
ITEM = {"id": "1", "description": "A starship crew picks up a signal.", "tag": "sci-fi"}
PER_USER = [
    {"user_id": 7, "profile": [ITEM, {**ITEM, "id": "2", "tag": "action"}], "query": [{"id": "q7", "input": "Which tag?", "gold": "sci-fi"}]},
    {"user_id": "8", "profile": [], "query": [{"id": "q8", "input": "Which?"}]},
    {"user_id": 9, "profile": [ITEM]},
]
QUESTIONS = [
    {"id": "100", "input": "Which tag? a", "profile": [ITEM]},
    {"id": "101", "input": "Which tag? b", "profile": [ITEM, ITEM]},
]
OUTPUTS = {"task": "LaMP_2", "golds": [{"id": "100", "output": "comedy"}, {"id": "101", "output": "action"}]}


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_per_user_layout(tmp_path):
    users = load_users(_write(tmp_path / "users.json", PER_USER), LAMP2)
    assert [u.user_id for u in users] == ["7", "8", "9"]
    assert users[0].profile == PER_USER[0]["profile"]
    assert users[0].queries == [Query("q7", "Which tag?", "sci-fi")]
    assert users[1].queries == [Query("q8", "Which?", None)] and users[1].profile == []
    assert users[2].queries == []


def test_official_layout_with_outputs(tmp_path):
    _write(tmp_path / "dev_outputs.json", OUTPUTS)
    users = load_users(_write(tmp_path / "dev_questions.json", QUESTIONS), LAMP2)
    assert users == [User("100", [ITEM], [Query("100", "Which tag? a", "comedy")]),
                     User("101", [ITEM, ITEM], [Query("101", "Which tag? b", "action")])]


def test_predictions_in_lamp_format(tmp_path):
    """Written as LaMP's own outputs files spell the task (its evaluator asserts preds['task'] == 'LaMP_2'),
    read back in either spelling."""
    written = predictions_file("LaMP-2", OUTPUTS["golds"])
    assert written == OUTPUTS
    path = _write(tmp_path / "p.json", written)
    assert read_predictions(path, "LaMP-2") == {"100": "comedy", "101": "action"}
    _write(path, {**written, "task": "LaMP-2"})
    assert read_predictions(path, "LaMP-2") == {"100": "comedy", "101": "action"}
    with pytest.raises(MTAError, match="holds predictions for 'LaMP-2', not LaMP-4"):
        read_predictions(path, "LaMP-4")


def test_official_layout_without_outputs(tmp_path):
    users = load_users(_write(tmp_path / "test_questions.json", QUESTIONS))
    assert [u.queries[0].gold for u in users] == [None, None]
    users = load_users(_write(tmp_path / "plain.json", QUESTIONS))  # no "questions" in the name: no outputs looked for
    assert [u.user_id for u in users] == ["100", "101"]


def test_real_shared_data_loads(tmp_path):
    from conftest import SHARED_LAMP

    path = SHARED_LAMP / "movie_tagging.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    users = load_users(path, LAMP2)
    assert len(users) == 48 and all(len(u.profile) == 10 and len(u.queries) == 1 for u in users)


def test_synthetic_fixture_loads(movie_data):
    users = load_users(movie_data, LAMP2)
    assert len(users) == 12 and all(len(u.profile) == 6 for u in users)


# -- bad files -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("users.json", '[{"user_id": 1, "profile": [', r"data file .*users.json is not valid JSON \(line 1, column \d+"),
    ("dev_questions.json", '[{"id": "1",}]', r"data file .*dev_questions.json is not valid JSON \(line 1"),
    ("users.json", b"\xff\xfe[]", "is not UTF-8 text"),
    ("users.json", '{"user_id": 1}', "expected a JSON list of users or questions, got dict"),
    ("users.json", "[]", "holds no users"),
])
def test_unreadable_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MTAError, match=message):
        load_users(path, LAMP2)


def test_missing_file(tmp_path):
    with pytest.raises(MTAError, match="data file not found: .*nope.json"):
        load_users(tmp_path / "nope.json")


@pytest.mark.parametrize("data, message", [
    ([{"user_id": 1, "profile": []}, {"user_id": 2}], r"user #1: missing field\(s\) \['profile'\]"),
    ([{"user_id": 1, "profile": {"a": 1}}], "user 1: 'profile' must be a list of items"),
    ([{"user_id": 1, "profile": [], "query": [{"id": "q"}]}], r"user 1, query #0: missing field\(s\) \['input'\]"),
    ([{"user_id": 1, "profile": [], "query": ["text"]}], "user 1, query #0: expected an object, got str"),
    ([{"user_id": 1, "profile": [{"description": "x"}]}],
     r"user 1, profile item 0: profile item lacks field\(s\) \['tag'\] required by LaMP-2"),
    ([{"user_id": 1, "profile": []}, {"user_id": "1", "profile": []}], "user id '1' appears twice"),
], ids=["no-profile", "profile-not-list", "query-no-input", "query-not-object", "item-no-tag", "duplicate"])
def test_per_user_bad_content(tmp_path, data, message):
    with pytest.raises(MTAError, match=message):
        load_users(_write(tmp_path / "users.json", data), LAMP2)


@pytest.mark.parametrize("questions, outputs, message", [
    ([{"id": "1", "input": "q"}], None, r"dev_questions.json: question #0: missing field\(s\) \['profile'\]"),
    (["just text"], None, "question #0: expected an object, got str"),
    ([{"id": "1", "input": "q", "profile": [{"tag": "x"}]}], None, r"question '1', profile item 0: .*lacks field\(s\) \['description'\]"),
    (QUESTIONS, "{broken", r"outputs file .*dev_outputs.json is not valid JSON"),
    (QUESTIONS, {"task": "LaMP_2"}, r"dev_outputs.json: missing field\(s\) \['golds'\]"),
    (QUESTIONS, {"golds": [{"id": "100"}]}, r"dev_outputs.json: gold #0: missing field\(s\) \['output'\]"),
    (QUESTIONS, {"golds": "comedy"}, r"dev_outputs.json: 'golds' must be a list"),
    (QUESTIONS, {"golds": [{"id": "100", "output": "a"}, {"id": "100", "output": "b"}]}, "dev_outputs.json: id '100' appears twice"),
], ids=["no-profile", "not-object", "item-no-description", "outputs-not-json", "outputs-no-golds", "gold-no-output",
        "golds-not-list", "gold-twice"])
def test_official_bad_content(tmp_path, questions, outputs, message):
    if outputs is not None:
        _write(tmp_path / "dev_outputs.json", outputs)
    with pytest.raises(MTAError, match=message):
        load_users(_write(tmp_path / "dev_questions.json", questions), LAMP2)


def test_find_user(tmp_path):
    users = load_users(_write(tmp_path / "users.json", PER_USER))
    assert find_user(users, 7) is users[0] and find_user(users, "9") is users[2]
    with pytest.raises(MTAError, match=r"unknown user '42': not among the 3 users of the data file \(e.g. 7, 8, 9\)"):
        find_user(users, "42")


def test_require_profile():
    assert require_profile(User("a", [ITEM])) == [ITEM]
    with pytest.raises(MTAError, match="user 'a' has an empty profile"):
        require_profile(User("a", []))


# -- fuzzed: whatever JSON a file holds, the readers answer with data or an MTAError -----------------------------------

FUZZ_EXAMPLES = int(os.environ.get("MTA_FUZZ_EXAMPLES", "100"))
# the layouts' own keys, so that generated documents get past the first checks and into the readers' depths
KEYS = ["user_id", "profile", "query", "id", "input", "gold", "description", "tag", "task", "golds", "output", "text", "score"]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.sampled_from(["LaMP_2", "LaMP-2", "1"])
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3),
                                                                                          inner, max_size=6), max_leaves=30)
# documents of the right outline whose fields hold anything
ITEMS = st.fixed_dictionaries({}, optional={"id": JSON, "description": JSON, "tag": JSON})
USERS = st.lists(st.fixed_dictionaries({"user_id": JSON}, optional={"profile": st.lists(ITEMS, max_size=3) | JSON,
                                                                    "query": st.lists(JSON, max_size=3) | JSON}), min_size=1, max_size=4)
GOLDS = st.fixed_dictionaries({"task": SCALARS}, optional={"golds": st.lists(st.dictionaries(st.sampled_from(["id", "output"]), JSON),
                                                                                  max_size=4) | JSON})
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_mta_errors(read, *args):
    try:
        read(*args)
    except MTAError as e:
        assert "\n" not in str(e)


@FUZZ
@given(doc=JSON | USERS)
def test_any_per_user_document_loads_or_says_why(tmp_path, doc):
    _only_mta_errors(load_users, _write(tmp_path / "users.json", json.dumps(doc)), LAMP2)


@FUZZ
@given(questions=JSON | st.lists(st.fixed_dictionaries({"id": JSON, "input": JSON, "profile": st.lists(ITEMS, max_size=3) | JSON}),
                                 min_size=1, max_size=3), outputs=JSON | GOLDS)
def test_any_official_document_loads_or_says_why(tmp_path, questions, outputs):
    _write(tmp_path / "dev_outputs.json", json.dumps(outputs))
    _only_mta_errors(load_users, _write(tmp_path / "dev_questions.json", json.dumps(questions)), LAMP2)


@FUZZ
@given(doc=JSON | GOLDS)
def test_any_predictions_document_reads_or_says_why(tmp_path, doc):
    _only_mta_errors(read_predictions, _write(tmp_path / "p.json", json.dumps(doc)), "LaMP-2")


@FUZZ
@given(data=st.binary(max_size=40))
def test_any_bytes_read_or_say_why(tmp_path, data):
    (tmp_path / "users.json").write_bytes(data)
    _only_mta_errors(load_users, tmp_path / "users.json", LAMP2)
