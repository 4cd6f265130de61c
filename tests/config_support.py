"""The issue's example config, shared by the config and CLI tests."""

ISSUE_EXAMPLE = """\
models:
  qwen:   {backend: openai, model: Qwen/Qwen2-72B-Instruct, base_url: http://127.0.0.1:8000/v1, api_key_env: TOGETHER_API_KEY}
  smol:   {backend: llamacpp, model: smollm2-135m-instruct, n_threads: 2}
pipelines:
  my-moa:
    kind: moa
    layers:
      - [qwen, smol, {model: smol, temperature: 1.0, system: "You are a careful fact checker."}]
      - [qwen, smol]
    aggregator: qwen
"""
