from cachelora.adapters import load_adapter_model
from cachelora.base_model import load_base
from cachelora.cost import BATCH_SIZES, measure, parameter_count


def test_an_adapter_is_timed_merged_at_the_base_models_size(tiny_adapter):
    base = load_base("all-MiniLM-L6-v2")
    adapted = load_adapter_model(tiny_adapter)
    assert parameter_count(adapted) > parameter_count(base)  # LoRA matrices beside the base weights
    queries = [f"how long does recovery take after surgery number {i}" for i in range(40)]
    figures = measure(adapted, queries, repeats=1)
    assert figures["parameters"] == parameter_count(base) == 22_713_216
    assert all(figures[f"ms_per_query_batch_{b}"] > 0 for b in BATCH_SIZES)
    assert not hasattr(adapted[0].model, "peft_config")
