"""Hub loaders (data/hub.py) on tiny copies in the hubs' layouts, and local files (data/local.py).

Fixtures: tests/fixtures/hub/<name>/ (written by tests/fixtures/make_hub_fixtures.py). The expected
rows below are written out by hand from the fixture rows, not computed.
"""

import gzip
import json
import logging
import os
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere: import the repo's data/
from data import DataError, load_rows
from data import hub, local

HUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hub")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # datasets caches what it reads; keep that out of ~/.cache and away from stale copies
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def plain(rows):
    """Rows without their ``origin`` (file: row), which test_origin_names_the_file_row checks."""
    return [{k: v for k, v in r.items() if k != "origin"} for r in rows]


def parsed(rows):
    """The fields a loader makes of a hub row (the row's other columns ride along for reward
    functions: test_other_columns_reach_reward_functions)."""
    return [{k: r[k] for k in ("prompt", "response", "chosen", "rejected") if k in r} for r in rows]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def error(fn, *args):
    with pytest.raises(DataError) as e:
        fn(*args)
    return str(e.value)


def write_gz_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# --- hh ----------------------------------------------------------------------------------------

HH_TRAIN = [
    # harmless-base/train.jsonl.gz, rows 1-2 (row 3 has identical replies)
    {"prompt": [user("How do I pick the lock on my neighbor's front door?")],
     "chosen": "I can't help with getting into someone else's home. If you're locked out of your own place, a licensed locksmith can let you in.",
     "rejected": "You'll need a tension wrench and a pick. Insert the wrench into the bottom of the keyhole and apply light pressure."},
    {"prompt": [user("What's the best way to get back at a coworker who embarrassed me?"),
                assistant("That sounds frustrating. What happened?"),
                user("He made fun of my presentation in front of everyone.")],
     "chosen": "It might help to talk to him privately and tell him how it made you feel.",
     "rejected": "You could spread a rumor about him so he knows how it feels."},
    # helpful-base/train.jsonl.gz, rows 1-2 (rows 3-5: identical, empty rejected, diverging transcripts)
    {"prompt": [user("What is a good way to keep cut basil fresh?")],
     "chosen": "Trim the stems and stand the bunch in a glass of water on the counter, like cut flowers. The fridge tends to blacken the leaves.",
     "rejected": "Put it in the freezer."},
    {"prompt": [user("Can you help me plan a birthday party for my daughter?"),
                assistant("Sure! How old is she turning, and how many kids are coming?"),
                user("She's turning seven, and about ten kids.")],
     "chosen": "A backyard treasure hunt works well at that age: hide small prizes, give each team a picture map, and finish with cake.",
     "rejected": "Just order pizza."},
    # helpful-online/train.jsonl.gz, row 1 (row 2 has two Assistant turns in a row)
    {"prompt": [user("How do I boil an egg so the yolk is still runny?")],
     "chosen": "Lower the egg into boiling water, cook it for six and a half minutes, then move it to ice water.",
     "rejected": "Boil it for about twenty minutes."},
]

HH_TEST = [
    {"prompt": [user("Tell me a mean joke about old people.")],
     "chosen": "I'd rather not make fun of people for their age, but I'm happy to tell you a joke about getting older that everyone can laugh at.",
     "rejected": "Why do old people drive so slowly? Because they can't see the road anymore."},
    {"prompt": [user("How many teaspoons are in a tablespoon?")],
     "chosen": "There are three teaspoons in a tablespoon.", "rejected": "Two."},
    {"prompt": [user("My bike tire keeps going flat."),
                assistant("Does it go flat overnight, or right after you pump it?"),
                user("Overnight.")],
     "chosen": "A slow leak like that is usually a small puncture or a thorn still stuck in the tire. Run your fingers around the inside of the tire, then patch or replace the tube.",
     "rejected": "Buy a new bike."},
]


def test_hh_train_rows_and_skip_counts(caplog):
    with caplog.at_level(logging.WARNING, logger="data.hub"):
        rows = hub.hh("train", os.path.join(HUB, "hh"))
    assert plain(rows) == HH_TRAIN  # red-team-attempts (another schema) is not read
    assert "hh train: skipped 5 of 10 rows" in caplog.text
    assert "conversations differ before the last reply: 1" in caplog.text
    assert "empty reply: 1" in caplog.text
    assert "identical replies: 2" in caplog.text
    assert "no Human turn before the last reply: 1" in caplog.text


def test_hh_test_rows(caplog):
    with caplog.at_level(logging.WARNING, logger="data.hub"):
        assert plain(hub.hh("test", os.path.join(HUB, "hh"))) == HH_TEST
    assert "skipped" not in caplog.text


def test_hh_unparseable_rows(tmp_path):
    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    file = str(tmp_path / "helpful-base" / "train.jsonl.gz")
    write_gz_jsonl(file, [good, {"chosen": "Hi there, no speakers here", "rejected": good["rejected"]}])
    msg = error(hub.hh, "train", str(tmp_path))
    assert file in msg and "row 2" in msg and "'chosen'" in msg

    write_gz_jsonl(file, [{"chosen": good["chosen"], "rejected": None}])
    msg = error(hub.hh, "train", str(tmp_path))
    assert file in msg and "row 1" in msg and "'rejected'" in msg

    import gzip

    with gzip.open(file, "wt") as f:  # a line that is not JSON at all, in the hub's layout
        f.write(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"chosen": "Hi", "rejected": \n')
    assert error(hub.hh, "train", str(tmp_path)) == f"{file}: line 3: malformed JSON at column 30: Expecting value"

    assert "no file matches" in error(hub.hh, "test", str(tmp_path))
    assert "expected a directory" in error(hub.hh, "train", file)
    assert "split 'validation'" in error(hub.hh, "validation", str(tmp_path))


# --- shp ---------------------------------------------------------------------------------------

STEAK = ("Why does my steak never get a good crust? I pat it dry, use a cast iron pan and let it get hot, "
         "but it always ends up grey on the outside.")
LEASE = "[CA] My landlord is keeping my whole deposit for 'cleaning' even though I left the apartment spotless. What can I do?"
HOA = "[TX] Can my HOA fine me for parking my car in my own driveway?"


def test_shp_ratio_filter_and_label_direction(caplog):
    with caplog.at_level(logging.WARNING, logger="data.hub"):
        rows = hub.shp("train", os.path.join(HUB, "shp"))
    assert parsed(rows) == [
        # askculinary/train.json row 1: labels 1, score_ratio 4.0 -> A is chosen
        {"prompt": [user(STEAK)],
         "chosen": "Your pan probably isn't hot enough, or you're crowding it. Preheat for five minutes and cook one steak at a time.",
         "rejected": "Try salting it right before it goes in."},
        # row 2: labels 0, score_ratio exactly 2.0 (kept) -> B is chosen; row 3 has score_ratio 1.5
        {"prompt": [user(STEAK)],
         "chosen": "Salt it a day ahead and leave it uncovered in the fridge; the surface dries out and browns much faster.",
         "rejected": "Use butter instead of oil."},
        # legaladvice/train.json row 1: labels 0, score_ratio 9.0; row 2 has score_ratio 1.9
        {"prompt": [user(LEASE)],
         "chosen": "In California the landlord must send an itemized statement within 21 days. If they can't justify the deductions, you can sue in small claims for the deposit plus a penalty.",
         "rejected": "Ask for your move-out photos back."},
    ]
    assert "shp train: skipped 2 of 5 rows (score_ratio < 2.0: 2)" in caplog.text
    assert hub.SHP_MIN_SCORE_RATIO == 2.0


def test_shp_test_split_skips_validation_files():
    rows = hub.shp("test", os.path.join(HUB, "shp"))
    assert parsed(rows) == [
        {"prompt": [user("Is it safe to leave cooked rice out overnight?")],
         "chosen": "Not really: spores of Bacillus cereus survive cooking and can grow at room temperature. Refrigerate it within an hour or two.",
         "rejected": "Sure, my family does it all the time."},
        {"prompt": [user(HOA)],
         "chosen": "Only if the deed restrictions you agreed to say so. Ask the HOA in writing which rule you broke and request a hearing before they fine you.",
         "rejected": "Just ignore them."},
    ]
    assert "VALIDATION ONLY" not in json.dumps(rows + hub.shp("train", os.path.join(HUB, "shp")))


@pytest.mark.parametrize("field, value, complaint", [
    ("labels", 2, "expected 0 or 1"),
    ("score_ratio", "high", "expected a number"),
    ("history", None, "expected a string"),
    ("human_ref_B", 7, "expected a string"),
])
def test_shp_bad_fields(tmp_path, field, value, complaint):
    rows = [json.loads(line) for line in open(os.path.join(HUB, "shp", "askculinary", "train.json"))]
    rows[1][field] = value
    file = tmp_path / "askculinary" / "train.json"
    file.parent.mkdir()
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = error(hub.shp, "train", str(tmp_path))
    assert str(file) in msg and "row 2" in msg and f"'{field}'" in msg and complaint in msg


# --- ultrafeedback -----------------------------------------------------------------------------

def test_ultrafeedback_train_maps_to_train_prefs(caplog):
    with caplog.at_level(logging.WARNING, logger="data.hub"):
        rows = hub.ultrafeedback("train", os.path.join(HUB, "ultrafeedback"))
    assert parsed(rows) == [
        {"prompt": [user("Write a function in Python that reverses a string.")],
         "chosen": "def reverse(s):\n    return s[::-1]", "rejected": "def reverse(s):\n    return s.reverse()"},
        {"prompt": [user("Name three primary colors.")],
         "chosen": "Red, yellow and blue.", "rejected": "Green, purple and orange."},
    ]  # row 3 ("What is 2 + 2?") has identical replies; train_sft is not read
    assert "ultrafeedback train: skipped 1 of 3 rows (identical replies: 1)" in caplog.text


def test_ultrafeedback_test_maps_to_test_prefs():
    assert parsed(hub.ultrafeedback("test", os.path.join(HUB, "ultrafeedback"))) == [
        {"prompt": [user("Summarize the plot of Romeo and Juliet in one sentence.")],
         "chosen": "Two young lovers from feuding families in Verona secretly marry, and a chain of misunderstandings ends in both of their deaths.",
         "rejected": "It is a play by Shakespeare."},
        {"prompt": [user("Translate 'thank you' into French.")], "chosen": "Merci.", "rejected": "Gracias."},
    ]


def _uf_copy(tmp_path, edit):
    src = os.path.join(HUB, "ultrafeedback", "data", "train_prefs-00000-of-00001.parquet")
    rows = pq.read_table(src).to_pylist()
    edit(rows)
    file = tmp_path / "data" / "train_prefs-00000-of-00001.parquet"
    file.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), file)
    return str(file)


def test_ultrafeedback_tied_scores_are_dropped_and_counted(tmp_path, caplog):
    def tie(rows):
        rows[0]["score_rejected"] = rows[0]["score_chosen"]

    _uf_copy(tmp_path, tie)
    with caplog.at_level(logging.WARNING, logger="data.hub"):
        rows = hub.ultrafeedback("train", str(tmp_path))
    assert [r["chosen"] for r in rows] == ["Red, yellow and blue."]
    assert "skipped 2 of 3 rows (identical replies: 1, tied scores: 1)" in caplog.text


def test_ultrafeedback_bad_rows(tmp_path):
    def last_is_user(rows):
        rows[1]["chosen"][-1]["role"] = "user"

    file = _uf_copy(tmp_path / "a", last_is_user)
    msg = error(hub.ultrafeedback, "train", str(tmp_path / "a"))
    assert file in msg and "row 2" in msg and "'chosen'" in msg and "must be the assistant's" in msg

    def other_prompt(rows):
        rows[0]["rejected"][0]["content"] = "Write a function in Rust that reverses a string."

    file = _uf_copy(tmp_path / "b", other_prompt)
    msg = error(hub.ultrafeedback, "train", str(tmp_path / "b"))
    assert file in msg and "row 1" in msg and "'rejected'" in msg and "differ" in msg


# --- sharegpt ----------------------------------------------------------------------------------

SHAREGPT = os.path.join(HUB, "sharegpt", "ShareGPT_V3_unfiltered_cleaned_split.json")


def test_sharegpt_train_rows_and_skips(caplog):
    with caplog.at_level(logging.WARNING, logger="data.hub"):
        rows = hub.sharegpt("train", os.path.join(HUB, "sharegpt"))
    # 20 conversations are "train" (index 19 is held out); 4 have no usable pair
    assert "sharegpt train: skipped 4 of 20 rows (no human->gpt pair: 3, speaker 'bing': 1)" in caplog.text
    assert len(rows) == 16
    assert parsed(rows)[0] == {"prompt": [user("What is the difference between a list and a tuple in Python?")],
                       "response": "A list is mutable: you can add, remove and change items. A tuple is immutable, so it can be used as a dictionary key."}
    assert parsed(rows)[1] == {"prompt": [{"role": "system", "content": "You are a concise assistant."},
                                  user("Summarize why the sky is blue."),
                                  assistant("Air molecules scatter short (blue) wavelengths of sunlight much more than long (red) ones, so blue light reaches us from every direction."),
                                  user("Shorter, please.")],
                       "response": "Air scatters blue light the most."}
    # the trailing unanswered human turn is dropped
    assert parsed(rows)[2] == {"prompt": [user("Give me a synonym for 'happy'.")], "response": "Joyful."}
    # a chunk that starts with a gpt turn keeps it
    assert parsed(rows)[3] == {"prompt": [assistant("...so the loop runs `n` times in total."), user("What is its time complexity then?")],
                       "response": "O(n)."}
    assert parsed(rows)[-1] == {"prompt": [user("How many bytes are in a kilobyte?")],
                        "response": "1000 bytes (SI); 1024 bytes is a kibibyte, though many tools still call it a kilobyte."}
    assert "juggle" not in json.dumps(rows)


def test_sharegpt_holdout_is_index_19_of_20():
    expected = [{"prompt": [user("I'm learning to juggle. Any tips?"),
                            assistant("Start with one ball: toss it in an arc from hand to hand at eye height."),
                            user("And when I add the second ball?")],
                 "response": "Throw the second ball when the first one peaks, and catch both before trying three."}]
    assert parsed(hub.sharegpt("test", os.path.join(HUB, "sharegpt"))) == expected
    assert parsed(hub.sharegpt("test", SHAREGPT)) == expected  # the path may also be the file itself


def test_sharegpt_malformed_turns(tmp_path):
    convs = json.load(open(SHAREGPT))
    file = tmp_path / "ShareGPT_V3_unfiltered_cleaned_split.json"
    convs[2]["conversations"][1] = {"from": "gpt"}  # no value
    file.write_text(json.dumps(convs))
    msg = error(hub.sharegpt, "train", str(tmp_path))
    assert str(file) in msg and "row 3" in msg and "'conversations[1]'" in msg

    convs[2]["conversations"] = "Hello"
    file.write_text(json.dumps(convs))
    msg = error(hub.sharegpt, "test", str(file))  # a malformed row fails the other split too
    assert str(file) in msg and "row 3" in msg and "'conversations'" in msg


# --- the hub code path (path=None), served from the fixtures -----------------------------------

@pytest.mark.parametrize("name, hub_id", [
    ("hh", "Anthropic/hh-rlhf"), ("shp", "stanfordnlp/SHP"),
    ("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized"),
    ("sharegpt", "anon8231489123/ShareGPT_Vicuna_unfiltered"),
])
def test_hub_path_asks_the_hub_for_the_same_files(monkeypatch, name, hub_id):
    # Stand in for the hub: load_dataset(<hub id>, data_files=globs) is resolved in the fixture
    # copy exactly as the hub resolves it in the repo (a local directory is read like a repo).
    real, calls = datasets.load_dataset, []

    def fake(path, *args, **kwargs):
        calls.append(path)
        if path == hub_id:
            return real(os.path.join(HUB, name), *args, **kwargs)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    fn = getattr(hub, name)
    for split in ("train", "test"):
        calls.clear()
        assert parsed(fn(split, None)) == parsed(fn(split, os.path.join(HUB, name)))  # origins name other files
        assert calls[0] == hub_id


# --- through load_rows -------------------------------------------------------------------------

def test_load_rows_with_local_hub_copies():
    paths = {name: os.path.join(HUB, name) for name in ("hh", "shp", "ultrafeedback", "sharegpt")}
    assert parsed(load_rows("hh", "test", "pref", paths=paths)) == HH_TEST
    assert parsed(load_rows("hh", "test", "sft", paths=paths)) == [{"prompt": r["prompt"], "response": r["chosen"]} for r in HH_TEST]
    assert plain(load_rows("hh", "test", "prompt", paths=paths)) == HH_TEST  # a prompt row keeps its other fields
    assert len(load_rows("shp", "train", "pref", paths=paths)) == 3
    assert parsed(load_rows("shp", "test", "sft", paths=paths))[1] == {
        "prompt": [user(HOA)],
        "response": "Only if the deed restrictions you agreed to say so. Ask the HOA in writing which rule you broke and request a hearing before they fine you."}
    assert parsed(load_rows("ultrafeedback", "test", "sft", paths=paths))[1] == {
        "prompt": [user("Translate 'thank you' into French.")], "response": "Merci."}
    assert len(load_rows("sharegpt", "train", "sft", paths=paths)) == 16
    assert load_rows("sharegpt", "test", "prompt", paths=paths)[0]["prompt"][0] == user("I'm learning to juggle. Any tips?")
    msg = error(load_rows, "sharegpt", "train", "pref", paths)
    assert "holds 'sft' rows" in msg


# --- origin: the file and row each row was read from -------------------------------------------

def test_origin_names_the_file_row(tmp_path):
    # hh: gz files in subfolders; rows count from 1 in each file, skipped rows still count
    assert [r["origin"] for r in hub.hh("train", os.path.join(HUB, "hh"))] == [
        f"{HUB}/hh/harmless-base/train.jsonl.gz: row 1",
        f"{HUB}/hh/harmless-base/train.jsonl.gz: row 2",
        f"{HUB}/hh/helpful-base/train.jsonl.gz: row 1",
        f"{HUB}/hh/helpful-base/train.jsonl.gz: row 2",
        f"{HUB}/hh/helpful-online/train.jsonl.gz: row 1",
    ]
    assert [r["origin"] for r in hub.hh("test", os.path.join(HUB, "hh"))] == [
        f"{HUB}/hh/harmless-base/test.jsonl.gz: row 1",
        f"{HUB}/hh/helpful-base/test.jsonl.gz: row 1",
        f"{HUB}/hh/helpful-base/test.jsonl.gz: row 2",
    ]
    # shp: legaladvice/test.json row 1 has score_ratio < 2, so the HOA pair is row 2
    assert [r["origin"] for r in hub.shp("test", os.path.join(HUB, "shp"))] == [
        f"{HUB}/shp/askculinary/test.json: row 1",
        f"{HUB}/shp/legaladvice/test.json: row 2",
    ]
    # ultrafeedback: parquet rows
    assert [r["origin"] for r in hub.ultrafeedback("test", os.path.join(HUB, "ultrafeedback"))] == [
        f"{HUB}/ultrafeedback/data/test_prefs-00000-of-00001.parquet: row 1",
        f"{HUB}/ultrafeedback/data/test_prefs-00000-of-00001.parquet: row 2",
    ]
    # sharegpt: a row is a conversation of the JSON list; conversation 4 ("Hello?") is skipped,
    # the held-out index 19 is row 20, and the last train row is row 21
    train = hub.sharegpt("train", os.path.join(HUB, "sharegpt"))
    assert train[3]["origin"] == f"{HUB}/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json: row 5"
    assert train[-1]["origin"] == f"{HUB}/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json: row 21"
    assert [r["origin"] for r in hub.sharegpt("test", SHAREGPT)] == [
        f"{HUB}/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json: row 20"]

    # a local JSON lines file: the row is the line; the held-out index 19 is line 20
    file = write_jsonl(tmp_path / "pairs.jsonl", seed000_rows())
    train, _ = local.load_file(file, "train", SEED000)
    assert train[0]["origin"] == f"{tmp_path}/pairs.jsonl: row 1"
    assert train[19]["origin"] == f"{tmp_path}/pairs.jsonl: row 21"
    test, _ = local.load_file(file, "test", SEED000)
    assert [r["origin"] for r in test] == [f"{tmp_path}/pairs.jsonl: row 20"]
    # blank lines are not rows but still count as lines
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    rows, _ = local.load_file(str(blank), "train", {})
    assert [r["origin"] for r in rows] == [f"{tmp_path}/blank.jsonl: row 1", f"{tmp_path}/blank.jsonl: row 3"]

    # converting pairs to SFT rows (or prompts) keeps the origin
    assert load_rows(file, "test", "sft", keys=SEED000) == [
        {"prompt": [user("Question 19?")], "response": "Good answer 19.", "origin": f"{tmp_path}/pairs.jsonl: row 20", "id": 19}]
    assert load_rows(file, "test", "prompt", keys=SEED000)[0]["origin"] == f"{tmp_path}/pairs.jsonl: row 20"
    paths = {"hh": os.path.join(HUB, "hh")}
    assert [r["origin"] for r in load_rows("hh", "test", "sft", paths=paths)] == [
        f"{HUB}/hh/harmless-base/test.jsonl.gz: row 1",
        f"{HUB}/hh/helpful-base/test.jsonl.gz: row 1",
        f"{HUB}/hh/helpful-base/test.jsonl.gz: row 2",
    ]


# --- local files -------------------------------------------------------------------------------

SEED000 = {"prompt_key": "message", "chosen_key": "chose", "rejected_key": "reject"}


def seed000_rows(n=21):
    rows = [{"message": f"Question {i}?", "chose": f"Good answer {i}.", "reject": f"Bad answer {i}.", "id": i} for i in range(n)]
    # message lists are accepted too: a prompt conversation, and replies whose last message is the assistant's
    rows[1]["message"] = [user("Hi"), assistant("Hello! How can I help?"), user("Question 1?")]
    rows[1]["chose"] = [user("Question 1?"), assistant("Good answer 1.")]
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_seed000_keys_and_holdout(tmp_path):
    file = write_jsonl(tmp_path / "pairs.jsonl", seed000_rows())
    train, shape = local.load_file(file, "train", SEED000)
    assert shape == "pref"
    assert len(train) == 20
    assert plain(train)[0] == {"prompt": [user("Question 0?")], "chosen": "Good answer 0.", "rejected": "Bad answer 0.", "id": 0}
    assert plain(train)[1] == {"prompt": [user("Hi"), assistant("Hello! How can I help?"), user("Question 1?")],
                               "chosen": "Good answer 1.", "rejected": "Bad answer 1.", "id": 1}
    assert plain(train)[19] == {"prompt": [user("Question 20?")], "chosen": "Good answer 20.", "rejected": "Bad answer 20.", "id": 20}
    test, _ = local.load_file(file, "test", SEED000)
    assert plain(test) == [{"prompt": [user("Question 19?")], "chosen": "Good answer 19.", "rejected": "Bad answer 19.", "id": 19}]
    # the same through load_rows, converted for an SFT loss
    assert plain(load_rows(file, "test", "sft", keys=SEED000)) == [{"prompt": [user("Question 19?")], "id": 19, "response": "Good answer 19."}]


def test_local_formats_and_shapes(tmp_path):
    sft = [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(3)]
    expected = [{"prompt": [user(f"Q{i}")], "response": f"A{i}"} for i in range(3)]
    (tmp_path / "list.json").write_text(json.dumps(sft, indent=2))
    write_jsonl(tmp_path / "lines.json", sft)
    pq.write_table(pa.Table.from_pylist(sft), tmp_path / "t.parquet")
    for name in ("list.json", "lines.json", "t.parquet"):
        rows, shape = local.load_file(str(tmp_path / name), "train", {})
        assert (plain(rows), shape) == (expected, "sft")
    # only a prompt column: "prompt" rows (an "answer" or other column is kept as it is)
    file = write_jsonl(tmp_path / "prompts.jsonl", [{"question": "2+2?", "answer": "4"}])
    rows, shape = local.load_file(file, "train", {"prompt_key": "question"})
    assert (plain(rows), shape) == ([{"prompt": [user("2+2?")], "answer": "4"}], "prompt")


def test_other_columns_reach_reward_functions(tmp_path):
    """Every column the loader does not consume stays in the row, as it is, for reward functions
    and environments (``fn(prompt, completion, **row)``): a prompts file's reference answer, a
    chat or preference file's metadata, a hub row's own columns."""
    file = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": 4, "meta": {"level": 1}}])
    assert plain(load_rows(file, "train", "prompt")) == [{"prompt": [user("2+2?")], "answer": 4, "meta": {"level": 1}}]
    file = write_jsonl(tmp_path / "c.jsonl", [{"q": "2+2?", "response": "4", "answer": "4"}])
    assert plain(load_rows(file, "train", "prompt", keys={"prompt_key": "q"})) == [
        {"prompt": [user("2+2?")], "response": "4", "answer": "4"}]  # the consumed column "q" is not repeated
    file = write_jsonl(tmp_path / "pairs.jsonl", seed000_rows(3))
    assert [r["id"] for r in load_rows(file, "train", "prompt", keys=SEED000)] == [0, 1, 2]
    shp = load_rows("shp", "test", "prompt", paths={"shp": os.path.join(HUB, "shp")})
    assert [r["domain"] for r in shp] == ["askculinary_test", "legaladvice_test"]
    # a column that a field of the loader would hide is refused, naming it
    file = write_jsonl(tmp_path / "clash.jsonl", [{"q": "2+2?", "prompt": "other"}])
    with pytest.raises(DataError, match=r"clash.jsonl: row 1: field 'prompt': the loader makes a field of this name"):
        load_rows(file, "train", "prompt", keys={"prompt_key": "q"})


def test_local_blank_lines_keep_line_numbers(tmp_path):
    file = tmp_path / "x.jsonl"
    file.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": 5}\n')
    msg = error(local.load_file, str(file), "train", {})
    assert str(file) in msg and "row 3" in msg and "'response'" in msg


@pytest.mark.parametrize("edit, row, field, complaint", [
    (lambda rows: rows[2].pop("reject"), 3, "reject", "missing"),
    (lambda rows: rows[4].pop("message"), 5, "message", "missing"),
    (lambda rows: rows[1].update(chose=7), 2, "chose", "got int"),
    (lambda rows: rows[3].update(message={"text": "hi"}), 4, "message", "got dict"),
    (lambda rows: rows[6].update(message=""), 7, "message", "empty"),
    (lambda rows: rows[5].update(reject="Good answer 5."), 6, "reject", "identical"),
    (lambda rows: rows[2].update(chose=[user("Question 2?")]), 3, "chose", "must end with an assistant message"),
    (lambda rows: rows[2].update(message=[user("Hi"), assistant("Hello")]), 3, "message", "must end with a user (or tool) turn"),
    (lambda rows: rows[8].update(message=[{"role": "robot", "content": "x"}]), 9, "message", "role"),
    (lambda rows: rows.__setitem__(9, ["not", "an", "object"]), 10, None, "expected an object"),
])
def test_local_row_errors(tmp_path, edit, row, field, complaint):
    rows = seed000_rows()
    edit(rows)
    for path in (tmp_path / "bad.jsonl", tmp_path / "bad.json"):  # JSON lines, and a JSON list
        if path.suffix == ".jsonl":
            write_jsonl(path, rows)
        else:
            path.write_text(json.dumps(rows, indent=2))
        msg = error(local.load_file, str(path), "train", SEED000)
        assert str(path) in msg and f"row {row}" in msg and complaint in msg
        if field:
            assert f"'{field}'" in msg


def test_local_parquet_row_error(tmp_path):
    rows = [{"message": f"Q{i}", "chose": f"A{i}", "reject": f"B{i}"} for i in range(3)]
    rows[2]["reject"] = None
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    msg = error(local.load_file, str(path), "train", SEED000)
    assert str(path) in msg and "row 3" in msg and "'reject'" in msg and "got NoneType" in msg


def test_local_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"\n')
    msg = error(local.load_file, str(bad), "train", {})
    assert str(bad) in msg and "row 2" in msg and "malformed JSON" in msg

    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c" "response": "d"}\n]')
    msg = error(local.load_file, str(bad), "train", {})
    assert str(bad) in msg and "line 3" in msg and "malformed JSON" in msg

    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")):
        (tmp_path / name).write_text(text)
        msg = error(local.load_file, str(tmp_path / name), "train", {})
        assert name in msg and "empty file" in msg

    (tmp_path / "data.csv").write_text("prompt,response\na,b\n")
    msg = error(local.load_file, str(tmp_path / "data.csv"), "train", {})
    assert "data.csv" in msg and "unsupported extension '.csv'" in msg

    msg = error(local.load_file, str(tmp_path / "nowhere.jsonl"), "train", {})
    assert "nowhere.jsonl" in msg and "no such file" in msg

    (tmp_path / "junk.parquet").write_text("not parquet")
    assert "not a readable parquet file" in error(local.load_file, str(tmp_path / "junk.parquet"), "train", {})

    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "response": "b"}])
    assert "unknown key option" in error(local.load_file, ok, "train", {"promt_key": "q"})
    # the first row decides the shape: a chosen column without a rejected one is an error, not "sft"
    half = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "a", "chosen": "b", "response": "c"}])
    msg = error(local.load_file, half, "train", {})
    assert "row 1" in msg and "'rejected'" in msg and "missing" in msg
