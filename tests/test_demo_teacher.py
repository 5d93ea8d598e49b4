"""The demo teacher: every rationale states evidence read from the inputs and step 6 follows from it."""

import re

import numpy as np
import pytest
from PIL import Image
from test_demo_data import CUE_RELATION, ENTITY_TYPE, SHAPE_TYPE, read_object

from configs import small_config
from morer1.demo_data import DemoDataConfig, generate_demo
from morer1.files import read_jsonl
from morer1.ingest import IngestConfig, ingest
from morer1.labels import NONE, type_pair
from morer1.parsing import parse_completion
from morer1.prompt import prompt_messages
from morer1.teachers import DemoTeacher, TeacherRequest, demo_rationale

STEPS = (
    r"Step 1: The entity (?P<entity>.+) is (?P<etype>\w+)\.",
    r"Step 2: In the title, (?P<entity3>.+?) (?:follows (?P<before>.+)|comes first)\.",
    r"Step 3: The crop shows a (?P<color>\w+) (?P<shape>\w+), so the object is (?P<otype>\w+)\.",
    r"Step 4: (?:The title says (?P<word>\w+) and the crop is (?P<color4>\w+): they (?P<match>match|differ)"
    r"|No colour and cue come before (?P<entity4>.+), so nothing links it to the crop)\.",
    r"Step 5: (?:(?P<cue>\w+) names (?P<relation>\S+), for (?P<pair>\w+/\w+); the pair is (?P<pair5>\w+/\w+): "
    r"(?P<fits>it fits|it does not fit)|No cue, so no relation)\.",
    r"Step 6: .+, so the relation is (?P<label>\S+)\.",
)


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root / "demo", small_config(DemoDataConfig, train_pairs=60, valid_pairs=1, test_pairs=1))
    ingest(root / "demo", root / "facts", IngestConfig())
    return root / "facts", read_jsonl(root / "facts" / "train.jsonl")


def read_back(rationale: str) -> dict:
    """The statements of the six steps, each parsed by its pattern."""
    think = parse_completion(rationale, [NONE]).think
    lines = think.split("\n")
    assert len(lines) == 6
    found = {}
    for line, pattern in zip(lines, STEPS):
        match = re.fullmatch(pattern, line)
        assert match, line
        found.update({k: v for k, v in match.groupdict().items() if v is not None})
    return found


def test_every_step_is_evidence_from_the_inputs_and_step_6_follows_from_steps_4_and_5(facts):
    root, rows = facts
    assert len(rows) > 200 and {f["relation"] for f in rows} != {NONE}
    seen = set()
    for fact in rows:
        rationale = demo_rationale(fact)
        said = read_back(rationale)
        # step 3: what the crop's pixels show
        with Image.open(root / fact["object"]["crop"]) as crop:
            pixels = np.asarray(crop.convert("RGB"))
        assert (said["shape"], said["color"]) == read_object(pixels, [0, 0, pixels.shape[1], pixels.shape[0]])
        assert said["otype"] == SHAPE_TYPE[said["shape"]]
        # steps 1 and 2: the entity, its type, and the two title words just before it
        assert said["entity"] == said["entity3"] == fact["entity"]["name"]
        assert said["etype"] == ENTITY_TYPE[said["entity"]]
        start = fact["entity"]["start"]
        assert said.get("before", "") == " ".join(fact["tokens"][max(0, start - 2):start])
        # steps 4 and 5: the comparisons are true of what steps 1-3 stated
        if "word" in said:
            assert said["color4"] == said["color"] and said["word"] == said["before"].split()[0]
            assert (said["match"] == "match") == (said["word"] == said["color"])
            assert said["cue"] == said["before"].split()[1] and said["relation"] == CUE_RELATION[said["cue"]]
            assert said["pair"] == "/".join(type_pair(said["relation"]))
            assert said["pair5"] == f"{said['otype']}/{said['etype']}"
            assert (said["fits"] == "it fits") == (said["pair"] == said["pair5"])
            derived = said["relation"] if said["match"] == "match" and said["fits"] == "it fits" else NONE
            seen.add((said["match"], said["fits"]))
        else:
            derived = NONE
            seen.add("unlinked")
        # step 6 and the answer: what steps 4-5 give, which is the gold
        assert said["label"] == derived == fact["relation"]
        assert parse_completion(rationale, [NONE, fact["relation"]]).label == fact["relation"]
    assert seen == {("match", "it fits"), ("match", "it does not fit"), ("differ", "it fits"),
                    ("differ", "it does not fit"), "unlinked"}


def test_a_fact_outside_the_demo_vocabulary_gets_no_rationale(facts):
    fact = dict(facts[1][0])
    teacher = DemoTeacher()
    other = {**fact, "object": {**fact["object"], "caption": "a man in a suit"}}
    unknown = {**fact, "entity": {**fact["entity"], "name": "Angela Merkel"}}
    requests = [TeacherRequest(f, (NONE,), prompt_messages(f, (NONE,)), ()) for f in (fact, other, unknown)]
    out = teacher.generate(requests)
    assert out[0] is not None and out[1] is None and out[2] is None
