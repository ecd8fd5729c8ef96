"""The typed events a run emits: the contract every progress consumer dispatches on."""

from __future__ import annotations

import dataclasses

import pytest

import sana_cli
from sana_cli.reporting import events as ev


def test_a_run_emits_typed_frozen_events_in_order(tmp_path, tiny_models):
    seen = []
    result = sana_cli.generate("a red fox", model="tiny", seed=5, steps=2, num_images=2, batch_size=2,
                               output=str(tmp_path / "fox.png"), events=seen.append)
    kinds = [type(event) for event in seen]
    assert kinds == [ev.Loading, ev.BatchStarted, ev.Step, ev.Step, ev.ImageWritten, ev.ImageWritten]
    assert seen[0].model.name == "tiny"
    assert (seen[1].number, seen[1].total, len(seen[1].jobs)) == (1, 1, 2)
    assert [(event.step, event.total) for event in seen[2:4]] == [(1, 2), (2, 2)]
    assert sorted(event.result.written.path for event in seen[4:]) == sorted(
        image.written.path for image in result.images)
    for event in seen:
        with pytest.raises(dataclasses.FrozenInstanceError):
            event.__setattr__(dataclasses.fields(event)[0].name, None)

