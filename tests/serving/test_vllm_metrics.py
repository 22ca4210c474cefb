"""/metrics under vLLM's names: after a known workload they say what the workload was, and what ours say."""

from __future__ import annotations

from tests.serving.conftest import InProcessApps, http_request, metric_values, wait_for_idle_pages

MODEL = 'model_name="tiny"'


def test_vllm_names_count_a_known_workload(apps: InProcessApps) -> None:
    url = apps.serve()
    n, k = 4, 5
    names = {
        "ttft": f"vllm:time_to_first_token_seconds_count{{{MODEL}}}",
        "itl": f"vllm:inter_token_latency_seconds_count{{{MODEL}}}",
        "tpot": f"vllm:time_per_output_token_seconds_count{{{MODEL}}}",
        "e2e": f"vllm:e2e_request_latency_seconds_count{{{MODEL}}}",
        "length": f'vllm:request_success_total{{finished_reason="length",{MODEL}}}',
        "generation": f"vllm:generation_tokens_total{{{MODEL}}}",
        "prompt": f"vllm:prompt_tokens_total{{{MODEL}}}",
    }
    before = metric_values(url)
    for i in range(n):
        body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": k, "ignore_eos": True}
        assert http_request(url, "POST", "/v1/completions", body).status == 200
    after = wait_for_idle_pages(url)
    delta = {key: after[name] - before.get(name, 0.0) for key, name in names.items()}
    prompt_tokens = n * len(apps.llm.encode_prompt("request 0"))
    expected = {"ttft": n, "itl": n * (k - 1), "tpot": n * (k - 1), "e2e": n, "length": n, "generation": n * k,
                "prompt": prompt_tokens}  # fmt: skip
    assert delta == expected
    # The same snapshot as ours, under both names.
    assert after[f"vllm:num_requests_running{{{MODEL}}}"] == after["tokenflow_requests_running"] == 0
    assert after[f"vllm:num_requests_waiting{{{MODEL}}}"] == 0
    assert after[f"vllm:kv_cache_usage_perc{{{MODEL}}}"] == 0.0
    ours = after["tokenflow_time_to_first_token_seconds_sum"] - before["tokenflow_time_to_first_token_seconds_sum"]
    theirs = after[f"vllm:time_to_first_token_seconds_sum{{{MODEL}}}"] - before.get(
        f"vllm:time_to_first_token_seconds_sum{{{MODEL}}}", 0.0
    )
    assert abs(ours - theirs) < 1e-9
