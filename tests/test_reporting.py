"""How tables and cards name things: ingredients by short unique names, local data by a readable name."""

from __future__ import annotations

from hf_soup.reporting.card import _local_dataset, _split_name
from hf_soup.reporting.names import short_names
from hf_soup.results import TaskInfo


def test_local_ingredients_are_named_by_their_run_folder_and_hub_ids_as_they_are():
    references = ["../pot/runs/lr1e-4", "/home/me/other/runs/lr2e-4", "org/ft-a", "./base"]
    assert short_names(references, hub=["org/ft-a"]) == {
        "../pot/runs/lr1e-4": "lr1e-4",
        "/home/me/other/runs/lr2e-4": "lr2e-4",
        "org/ft-a": "org/ft-a",
        "./base": "base",
    }


def test_two_runs_of_one_name_keep_as_many_parent_folders_as_tell_them_apart():
    references = ["../a/runs/v0", "../b/runs/v0", "../a/runs/v1"]
    names = short_names(references)
    assert names == {"../a/runs/v0": "a/runs/v0", "../b/runs/v0": "b/runs/v0", "../a/runs/v1": "v1"}
    assert len(set(names.values())) == len(references)


def test_a_hub_id_that_looks_like_a_local_run_keeps_its_namespace():
    assert short_names(["org/v0", "../runs/v0"], hub=["org/v0"]) == {"org/v0": "org/v0", "../runs/v0": "v0"}


def _task(dataset: str, name: str = "custom") -> TaskInfo:
    return TaskInfo(name, ["accuracy"], "accuracy", "accuracy", None, dataset, None)


def test_local_data_is_named_by_its_stem_and_typed_by_the_builder_that_read_it():
    assert _local_dataset(_task("../data/fine_foods/train.csv")) == (
        "csv",
        "fine_foods",
    )  # a split-named file
    assert _local_dataset(_task("../reviews.jsonl")) == ("json", "reviews")
    assert _local_dataset(_task("../shirts", "image-classification")) == ("imagefolder", "shirts")
    assert _split_name("test.csv") == "test" and _split_name("validation_matched") == "validation_matched"
