"""Run by tests/e2e/test_sdk_releases.py under one released `tinker` SDK (0.3.0 ... 0.38):
create a run, train it, forward, save its state, sample from saved weights, list its
checkpoints. Written against the API all those releases share; prints one JSON line.

Usage: python sdk_release_script.py BASE_URL API_KEY BASE_MODEL NAME [torch]
"""

import json
import sys

# torch is optional from 0.9 on (guarded imports) and costs seconds to import: unless
# told the release needs it, the script runs as a client without torch would.
if sys.argv[5:6] != ["torch"]:
    sys.modules["torch"] = None  # type: ignore[assignment]

import tinker  # noqa: E402
from tinker import types  # noqa: E402


def result(value):
    """Calls return a future in newer SDKs and the value itself in older ones."""
    return value.result() if hasattr(value, "result") and callable(value.result) else value


def datum(text: bytes) -> types.Datum:
    tokens = [256, *text]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64"),
            "weights": types.TensorData(data=[1.0] * (len(tokens) - 1), dtype="float32"),
        },
    )


def main(base_url: str, api_key: str, base_model: str, name: str) -> None:
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = result(service.create_lora_training_client(base_model=base_model, rank=8))
    data = [datum(b"old sdk"), datum(b"trains here")]
    adam = types.AdamParams(learning_rate=3e-3)
    losses = []
    for _ in range(4):
        fwd_bwd = training.forward_backward(data, "cross_entropy")
        optim = training.optim_step(adam)
        losses.append(fwd_bwd.result().metrics["loss:sum"])
        optim.result()
    forward = training.forward(data, "cross_entropy").result()
    logprobs = [len(out["logprobs"].tolist()) for out in forward.loss_fn_outputs]
    state_path = training.save_state(name).result().path
    sampler = training.save_weights_and_get_sampling_client(name)
    prompt = types.ModelInput.from_ints([256, *b"old"])
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=1)
    sample = result(sampler.sample(prompt=prompt, num_samples=2, sampling_params=params))
    rest = service.create_rest_client()
    listed = result(rest.list_checkpoints(training.model_id))
    print(
        json.dumps(
            {
                "version": getattr(tinker, "__version__", "?"),
                "module": tinker.__file__,
                "model_id": training.model_id,
                "losses": losses,
                "logprob_lengths": logprobs,
                "state_path": state_path,
                "sample_lengths": [len(s.tokens) for s in sample.sequences],
                "checkpoints": [c.tinker_path for c in listed.checkpoints],
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
