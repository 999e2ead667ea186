"""Naming a document's anaphors for training (`--name-anaphors`): who a document is about, and which
sentence openings are replaced."""

from __future__ import annotations

from training.views import name_anaphors, subject_names


def test_subject_is_the_name_the_document_repeats_not_the_rarer_side_name():
    docs = [{"text": "Tunisia has about 12 million inhabitants. It has its capital in Tunis. "
                     "The country lies in Africa. Tunisia uses the dinar."},
            {"text": "Nicaragua is home to the city of Diriamba. Diriamba observes UTC-6. "
                     "About 35,000 people live in Diriamba."},
            {"text": "Aranda de Duero is situated in Spain. It observes UTC+1."},
            {"text": "Local time in Setakamachi-takayanagi is UTC+9. The city is one of the urban centres of Japan."},
            {"text": "it has no capitalised name at all."}]
    # "Local" opens sentences in many documents: not a name
    docs += [{"text": f"Local time in Town{i} is UTC+{i}. Town{i} is small."} for i in range(5)]
    assert subject_names(docs)[:5] == ["Tunisia", "Diriamba", "Aranda de Duero", "Setakamachi-takayanagi", None]


def test_only_later_sentence_openings_that_do_not_name_the_subject_are_replaced():
    text = ("It is first. The city lies in Germany. It observes UTC+1. The population of Willebroek is 26,000. "
            "Willebroek is old. The city is home to a port.")
    assert name_anaphors(text, "Willebroek") == (
        "It is first. Willebroek lies in Germany. Willebroek observes UTC+1. The population of Willebroek is "
        "26,000. Willebroek is old. Willebroek is home to a port.")
    assert name_anaphors(text, None) == text
    # "The <noun> of ..." is not an anaphor, and a sentence naming the subject is left alone
    assert name_anaphors("Ghent is old. The capital of Belgium is Brussels.", "Ghent") == (
        "Ghent is old. The capital of Belgium is Brussels.")


def test_pronoun_views_make_later_name_openings_it_and_keep_the_first():
    from training.views import pronoun_views

    docs = [{"id": "a", "text": "Iyesi observes UTC+1. Iyesi lies in Nigeria. About 17,000 people live in Iyesi."},
            {"id": "b", "text": "Ghent is old. The capital of Belgium is Brussels."},  # no later opening: no view
            {"id": "c", "text": "Essen lies in Germany. Essen observes UTC+1."},
            {"id": "d", "text": "Nameless text. Nameless again."}]
    views, of = pronoun_views(docs, ["Iyesi", "Ghent", "Essen", None])
    assert of == [0, 2]
    assert [v["text"] for v in views] == [
        "Iyesi observes UTC+1. It lies in Nigeria. About 17,000 people live in Iyesi.",
        "Essen lies in Germany. It observes UTC+1."]
    assert views[0]["id"] == "a#pronoun"
    # a name that only begins a longer word is not the subject's opening
    assert pronoun_views([{"text": "Bad is here. Badajoz is near."}], ["Bad"]) == ([], [])
