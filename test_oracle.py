"""The exact oracle of the Shapes world (oracle.py): claims read from free text, CHAIR counts,
answer scoring."""
import pytest

import oracle
import shapes

OBJECTS = [{"name": "circle", "color": "red", "size": "large", "row": 0, "col": 0,
      "position": "top left", "bbox": [1, 1, 14, 14]},
     {"name": "square", "color": "blue", "size": "small", "row": 1, "col": 1,
      "position": "center", "bbox": [19, 19, 9, 9]},
     {"name": "circle", "color": "green", "size": "small", "row": 2, "col": 2,
      "position": "bottom right", "bbox": [35, 35, 9, 9]}]
CLAIM_LISTS = ("hallucinated_objects", "hallucinated_attributes", "hallucinated_relations",
               "false_negatives")


def test_the_oracle_reads_the_worlds_words():
    """Every shape the world draws has its words here, and every colour it paints has its name."""
    assert list(oracle.SYNONYMS) == shapes.SHAPES
    assert list(oracle.COLORS) == list(shapes.COLORS)


@pytest.mark.parametrize("text,keys", [
    ("There are three objects. A large red circle is at the top left. A small blue square is in "
     "the center. A small green circle is at the bottom right.", {}),
    ("A large red circle is at the top left. There is also a triangle.",
     {"hallucinated_objects": ["triangle"]}),
    ("The square is red.", {"hallucinated_attributes": ["square color=red"]}),
    ("A large red circle is at the bottom.",
     {"hallucinated_attributes": ["large red circle position=bottom"]}),
    ("No, there is no circle.", {"false_negatives": ["circle"]}),
    ("No, there is no triangle.", {}),
    ("Yes, there is a circle.", {}),
    ("Yes, there is a diamond.", {"hallucinated_objects": ["diamond"]}),
    ("There are two circles.", {}),
    ("There are three circles.", {"hallucinated_attributes": ["circle count=3"]}),
    ("There is one square. There are no diamonds.", {}),
    ("There are no squares.", {"false_negatives": ["square"]}),
    ("There is no blue square.", {"false_negatives": ["blue square"]}),
    ("There is no red square, and I can't see any triangle.", {}),
    ("The circle is to the left of the square.", {}),
    ("The square is above and to the left of the green circle.", {}),
    ("The square is to the left of the red circle.",
     {"hallucinated_relations": ["square left red circle"]}),
    ("The circle is red, not blue.", {}),
    ("All circles are red.", {"hallucinated_attributes": ["circle all color=red"]}),
    ("The object at the top left is a small blue square.",
     {"hallucinated_relations": ["object is small blue square"]}),
    ("Is there a triangle? No.", {}),
])
def test_oracle(text, keys):
    r = oracle.oracle(text, OBJECTS)
    for k in CLAIM_LISTS:
        assert r[k] == keys.get(k, []), (k, r[k])
    assert r["num_hallucinations"] == sum(len(v) for v in keys.values())


@pytest.mark.parametrize("junk", ["", None, "asdf ,,, ???", "no no no not never",
                                  "\x00\u2603 日本 <image></s>", "the the the of of is are",
                                  "To the left of above below and", "3 4 5 6 99999999999"])
def test_oracle_junk(junk):
    """Text without a shape word claims nothing: no mention, no hallucination, no exception."""
    r = oracle.oracle(junk, OBJECTS)
    assert r["mentions"] == [] and r["num_mentions"] == 0
    assert all(r[k] == [] for k in CLAIM_LISTS)
    assert r["num_hallucinations"] == 0 and r["num_hallucinated_objects"] == 0


def test_oracle_junk_repeating_a_present_shape():
    """500 bare mentions of a shape that is there: 500 mentions of one category, nothing false."""
    r = oracle.oracle("circle " * 500, OBJECTS)
    assert len(r["mentions"]) == 500 and {m["name"] for m in r["mentions"]} == {"circle"}
    assert r["num_mentions"] == 1 and r["num_hallucinations"] == 0
    # and of one that is not there: one hallucinated object
    absent = oracle.oracle("diamond " * 500, OBJECTS)
    assert absent["hallucinated_objects"] == ["diamond"] and absent["num_hallucinations"] == 1


def test_chair_counts():
    text = "A red circle and a triangle next to a diamond and another triangle."
    assert oracle.chair_counts(text, OBJECTS) == (3, 2)
    assert oracle.chair_counts("There is no triangle. Two circles and a box.", OBJECTS) == (2, 0)
    assert oracle.chair_counts("", OBJECTS) == (0, 0)


def test_score_answer():
    score = oracle.score_answer
    assert score("yesno", "Yes, there is a circle.", "yes")
    assert not score("yesno", "No, there is no circle.", "yes")
    assert score("count", "There are two circles.", 2)
    assert score("count", "No, there are no circles.", 0)
    assert score("count", "There is one circle.", 1) and not score("count", "junk", 1)
    # a leading yes/no is the reply to 'Are there two ...?', not a count of zero
    assert score("count", "No, there are three circles.", 3)
    assert score("color", "The large circle is red.", "red")
    assert not score("color", "The circle is blue.", "red")
    assert score("relation", "No, the circle is above the square.", "no")
    assert score("mc", "The circle is red. So the correct option is B.", "B")
    assert score("mc", "B. circle", "B") and not score("mc", "A", "B")
    key = shapes.describe(OBJECTS)
    assert score("describe", key, key)
    assert not score("describe", key.replace("green", "blue"), key)
    with pytest.raises(ValueError, match="unknown question type poem"):
        score("poem", "A circle.", "circle")
