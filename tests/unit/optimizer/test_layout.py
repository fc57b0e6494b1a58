"""One Layout for the memory model, the step-time model, the search and the explanation."""

import dataclasses

import numpy as np
import pytest

from mlpe.optimizer.errors import PlanInputError
from mlpe.optimizer.explain import describe_layout, explain
from mlpe.optimizer.hardware import parse_cluster
from mlpe.optimizer.layout import NAMES, Layout
from mlpe.optimizer.memory import breakdown, memory_arrays, plan_memory
from mlpe.optimizer.models import MODELS
from mlpe.optimizer.planner import search
from mlpe.optimizer.search import Plan, Training
from mlpe.optimizer.timing import plan_time, step_time, time_arrays

MODEL = MODELS["llama2-70b"]
CLUSTER = parse_cluster("4x8xH100")
LAYOUTS = [Layout(),
           Layout(tp=8, pp=4, dp=1, micro_batch=1, grad_accum=256, recompute="full"),
           Layout(tp=4, pp=2, virtual_stages=2, cp=2, dp=2, zero_stage=2, micro_batch=2,
                  grad_accum=8, recompute="selective", offload="optimizer"),
           Layout(dp=8, zero_stage=3, offload="params")]
FIELDS = [f.name for f in dataclasses.fields(Layout)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_and_timing_take_a_layout_or_its_fields(layout):
    assert plan_memory(MODEL, 4096, "bf16", "adamw", layout) == \
        plan_memory(MODEL, 4096, "bf16", "adamw", **layout.values())
    assert plan_time(MODEL, CLUSTER, 4096, 256, "bf16", "adamw", layout) == \
        plan_time(MODEL, CLUSTER, 4096, 256, "bf16", "adamw", **layout.values())
    # Keywords change the layout they come with.
    assert plan_memory(MODEL, 4096, layout=layout, recompute="full") == \
        plan_memory(MODEL, 4096, layout=layout.replace(recompute="full"))


def test_a_layout_of_arrays_is_evaluated_like_each_of_its_layouts():
    # Stacked in the form the formulas use: recompute and offload as codes.
    many = Layout(**{f: np.array([getattr(one.arrays(), f) for one in LAYOUTS]) for f in FIELDS})
    mem = memory_arrays(MODEL, 4096, "bf16", "adamw", many)
    times = time_arrays(MODEL, CLUSTER, 4096, 256, "bf16", "adamw", many)
    for i, one in enumerate(LAYOUTS):
        assert many.one(i) == one
        assert breakdown(mem, i) == plan_memory(MODEL, 4096, layout=one)
        assert step_time(times, i) == plan_time(MODEL, CLUSTER, 4096, 256, layout=one)[0]
    picked = many.select(np.array([False, True, False, True]))
    assert [picked.one(i) for i in range(2)] == [LAYOUTS[1], LAYOUTS[3]]


def test_derived_fields():
    layout = Layout(tp=4, pp=2, cp=2, dp=8, zero_stage=3)
    assert (layout.sp, layout.fsdp, layout.gpus) == (True, True, 128)
    assert (Layout().sp, Layout().fsdp, Layout().gpus) == (False, False, 1)


@pytest.mark.parametrize("field", ["recompute", "offload"])
def test_bad_names_are_input_errors_naming_the_field(field):
    with pytest.raises(PlanInputError) as err:
        plan_memory(MODEL, 4096, **{field: "sometimes"})
    assert err.value.field == f"plan.{field}"
    with pytest.raises(PlanInputError):
        plan_time(MODEL, CLUSTER, 4096, 256, **{field: "sometimes"})


def test_a_plan_is_its_layout_with_predictions():
    training = Training(256, 4096)
    result = search(MODEL, CLUSTER, training, top_k=3)
    for plan in result.plans:
        assert isinstance(plan, Plan) and isinstance(plan, Layout)
        layout = plan.replace()
        assert type(layout) is Layout and layout.values() == plan.values()
        # The plan's predictions are the models' for its layout.
        assert plan.memory == plan_memory(MODEL, 4096, layout=layout)
        assert plan.time == plan_time(MODEL, CLUSTER, 4096, 256, layout=layout)[0]


def test_every_layout_field_appears_in_the_explanation():
    training = Training(256, 4096)
    plan = search(MODEL, CLUSTER, training, top_k=1).plans[0]
    line = describe_layout(plan)
    assert line in explain(plan, MODEL, CLUSTER, training)
    for name in FIELDS:
        value = getattr(plan, name)
        if name in NAMES:
            names = NAMES[name]
            other = names[(names.index(value) + 1) % len(names)]
        else:
            other = 2 if value == 1 else 1
        changed = dataclasses.replace(plan, **{name: other})
        assert describe_layout(changed) != line, name
