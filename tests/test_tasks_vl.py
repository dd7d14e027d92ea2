"""nlvr and retrieval: labels balanced, each statement's truth and each caption re-checked by a
parser written apart from the generator, and captions distinctive enough for recall@1."""

import re
from collections import Counter

from tokensieve.tasks import COLOUR_NAMES, SHAPES, NlvrConfig, make_dataset
from tokensieve.tasks.attributes import NUMBER_WORDS, PLURALS
from tokensieve.tasks.nlvr import FACTS, IGNORED

MARGIN = 0.06 * 224
SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def _shape(word: str) -> str:
    return SINGULAR.get(word, word)


def _along(relation: str, subject, anchor) -> float:
    dx, dy = subject.center[0] - anchor.center[0], subject.center[1] - anchor.center[1]
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]


def _the(scene, colour: str | None, shape: str):
    (found,) = [o for o in scene.objects if o.shape == shape and colour in (None, o.colour)]
    return found


def _count_of(scene, word: str) -> int:
    if word in COLOUR_NAMES:
        return sum(o.colour == word for o in scene.objects)
    return sum(o.shape == _shape(word) for o in scene.objects)


def _truth(scene, text: str) -> bool:
    """Whether `text` holds in `scene`; asserts the statement is well defined there."""
    if m := re.fullmatch(r"there (?:is|are) exactly (\w+) (\w+) (\w+)", text):
        number, colour, noun = m.groups()
        return scene.count(colour, _shape(noun)) == NUMBER_WORDS.index(number)
    if m := re.fullmatch(r"there is (a|no) (\w+) (\w+)", text):
        present = scene.count(m.group(2), m.group(3)) > 0
        return present if m.group(1) == "a" else not present
    if m := re.fullmatch(r"the (\w+) (\w+) is (left of|right of|above|below) the (\w+) (\w+)", text):
        c1, s1, relation, c2, s2 = m.groups()
        offset = _along(relation, _the(scene, c1, s1), _the(scene, c2, s2))
        assert abs(offset) >= MARGIN, text
        return offset > 0
    if m := re.fullmatch(r"the (\w+) is (\w+)", text):
        return _the(scene, None, m.group(1)).colour == m.group(2)
    if m := re.fullmatch(r"there are more (\w+)(?: shapes)? than (\w+)(?: shapes)?", text):
        return _count_of(scene, m.group(1)) > _count_of(scene, m.group(2))
    raise AssertionError(f"unparsed statement: {text}")


def test_nlvr_labels_are_balanced_and_each_statement_is_true_exactly_when_labelled():
    data = make_dataset("nlvr", "val", size=400)
    labels, families = [], Counter()
    for index in range(400):
        scene, statement = data.scene(index)
        assert _truth(scene, statement.text) == statement.truth, statement.text
        labels.append(statement.truth)
        families[statement.family] += 1
    assert abs(sum(labels) / len(labels) - 0.5) <= 0.05
    assert set(families) == {"count", "exists", "colour", "relation", "compare"}


def _truth_from_facts(text: str, facts: dict[str, int]) -> bool:
    """The statement's truth, judged from its facts alone: they must be what it asks."""
    asked = {name for name, value in facts.items() if value != IGNORED}
    if m := re.fullmatch(r"there (?:is|are) exactly (\w+) \w+ \w+", text):
        assert asked == {"count_first"}
        return facts["count_first"] == NUMBER_WORDS.index(m.group(1))
    if m := re.fullmatch(r"there is (a|no) \w+ \w+", text):
        assert asked == {"count_first"}
        return (facts["count_first"] > 0) == (m.group(1) == "a")
    if m := re.fullmatch(r"the \w+ \w+ is (left of|right of|above|below) the \w+ \w+", text):
        assert asked == {"x_order", "y_order"}
        return {"left of": facts["x_order"] == 0, "right of": facts["x_order"] == 1,
                "above": facts["y_order"] == 0, "below": facts["y_order"] == 1}[m.group(1)]
    if m := re.fullmatch(r"the \w+ is (\w+)", text):
        assert asked == {"colour"}
        return COLOUR_NAMES[facts["colour"]] == m.group(1)
    assert text.startswith("there are more") and asked == {"count_first", "count_second"}
    return facts["count_first"] > facts["count_second"]


def test_nlvr_facts_are_what_each_statement_asks_and_decide_its_truth():
    data = make_dataset("nlvr", "val", size=200)
    for index in range(200):
        sample = data[index]
        facts = dict(zip(FACTS, sample["facts"].tolist(), strict=True))
        assert _truth_from_facts(sample["text"], facts) == bool(sample["label"]), sample["text"]
        for name, value in facts.items():
            assert value == IGNORED or 0 <= value < FACTS[name]


def _template(text: str) -> str:
    """The statement with colour and shape words blanked: 'there is no C S'."""
    return " ".join("C" if w in COLOUR_NAMES else "S" if _shape(w) in SHAPES else w for w in text.split())


def test_nlvr_statement_templates_occur_as_often_true_as_false():
    data = make_dataset("nlvr", "train", size=400)
    by_label = {True: Counter(), False: Counter()}
    for index in range(400):
        _, statement = data.scene(index)
        by_label[statement.truth][_template(statement.text)] += 1
    for template in set(by_label[True]) | set(by_label[False]):
        true, false = by_label[True][template], by_label[False][template]
        assert abs(true - false) <= 3 * (true + false) ** 0.5 + 2, template


def test_nlvr_family_weights_select_families():
    data = make_dataset("nlvr", "val", size=20, config=NlvrConfig(family_weights={"relation": 1.0}))
    assert {data.scene(i)[1].family for i in range(20)} == {"relation"}


def test_nlvr_names_small_objects_by_default_and_named_sizes_chooses_others():
    def named_sizes(config: NlvrConfig | None) -> set[str]:
        data = make_dataset("nlvr", "val", size=40, config=config)
        sizes = set()
        for index in range(40):
            scene, statement = data.scene(index)
            sizes |= {scene.objects[i].size_class for kind in statement.about for i in scene.indices(*kind)}
        return sizes

    assert named_sizes(None) == {"small"}
    assert named_sizes(NlvrConfig(named_sizes={"large": 1.0})) == {"large"}
    assert named_sizes(NlvrConfig(named_sizes=None)) == {"small", "medium", "large"}


def test_nlvr_draws_counts_most_often():
    data = make_dataset("nlvr", "train", size=600)
    families = Counter(data.scene(index)[1].family for index in range(600))
    assert families["count"] > families["exists"] > max(families["colour"], families["relation"])


def _caption_holds(scene, caption: str) -> bool:
    inventory, relation = caption.split(" , with the ")
    items = re.split(r" , | and ", inventory)
    listed = Counter()
    for item in items:
        number, colour, noun = item.split()
        listed[(colour, _shape(noun))] += 1 if number == "a" else NUMBER_WORDS.index(number)
    if listed != Counter((o.colour, o.shape) for o in scene.objects):
        return False
    m = re.fullmatch(r"(\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)", relation)
    c1, s1, way, c2, s2 = m.groups()
    return _along(way, _the(scene, c1, s1), _the(scene, c2, s2)) >= MARGIN


def test_each_caption_describes_its_own_scene_and_hardly_any_other():
    data = make_dataset("retrieval", "test", size=150)
    scenes = [data.scene(i) for i in range(150)]
    collisions = 0
    for i, (scene, caption) in enumerate(scenes):
        assert _caption_holds(scene, caption.text), caption.text
        others = [other for j, (other, _) in enumerate(scenes) if j != i]
        collisions += sum(_caption_holds(other, caption.text) for other in others)
    assert collisions <= 1


def test_captions_mention_three_to_six_objects():
    data = make_dataset("retrieval", "val", size=50)
    sizes = [len(data.scene(i)[0].objects) for i in range(50)]
    assert min(sizes) >= 3 and max(sizes) <= 6
