"""tinkerd.types mirrors the official SDK's types: names, fields, defaults, JSON."""

import numpy as np
import pytest
import tinker
import torch

from tinkerd import types


def test_model_input_helpers():
    mi = types.ModelInput.from_ints([1, 2, 3]).append_int(4)
    assert mi.to_ints() == [1, 2, 3, 4]
    assert mi.length == 4
    assert len(mi.chunks) == 2
    assert types.ModelInput.empty().length == 0


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_tensor_data_numpy_and_torch_round_trip(dtype):
    array = np.arange(6, dtype=dtype).reshape(2, 3)
    td = types.TensorData.from_numpy(array)
    assert td.shape == [2, 3]
    np.testing.assert_array_equal(td.to_numpy(), array)
    tensor = td.to_torch()
    assert tensor.shape == (2, 3)
    assert types.TensorData.from_torch(tensor) == td


def test_tensor_data_sparse_matches_sdk_encoding():
    dense = torch.zeros(4, 16, dtype=torch.int64)
    dense[0, 3], dense[2, 1], dense[3, 15] = 5, 7, 9
    sdk = tinker.TensorData.from_torch_sparse(dense)
    assert sdk.sparse_crow_indices is not None
    ours = types.TensorData(
        data=sdk.data,
        dtype=sdk.dtype,
        shape=sdk.shape,
        sparse_crow_indices=sdk.sparse_crow_indices,
        sparse_col_indices=sdk.sparse_col_indices,
    )
    assert torch.equal(ours.to_torch(), dense)


@pytest.mark.parametrize(
    "value",
    [
        [1, 2, 3],
        np.array([1, 2, 3]),
        torch.tensor([1, 2, 3]),
        types.TensorData(data=[1, 2, 3], dtype="int64"),
    ],
)
def test_datum_accepts_lists_arrays_tensors_tensordata(value):
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([0, 1, 2]),
        loss_fn_inputs={"target_tokens": value, "weights": [1, 0, 1]},
    )
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [1, 2, 3]
    assert datum.loss_fn_inputs["weights"].dtype == "float32"  # by key, as the SDK does


def test_adam_defaults_match_sdk():
    assert types.AdamParams().model_dump() == tinker.AdamParams().model_dump()


@pytest.mark.parametrize(
    "name",
    [
        "Datum",
        "ModelInput",
        "EncodedTextChunk",
        "TensorData",
        "AdamParams",
        "LoraConfig",
        "ForwardBackwardOutput",
        "OptimStepResponse",
        "GetInfoResponse",
        "ModelData",
        "UnloadModelResponse",
        "GetServerCapabilitiesResponse",
        "SupportedModel",
    ],
)
def test_type_names_and_fields_match_sdk(name):
    ours, sdk = getattr(types, name), getattr(tinker.types, name)
    sdk_fields = set(getattr(sdk, "model_fields", None) or sdk.__dataclass_fields__)
    sdk_fields -= {"model_input_spans", "loss_fn_input_spans", "_numpy"}  # SDK-only extras
    assert sdk_fields <= set(ours.model_fields), sdk_fields - set(ours.model_fields)


def test_datum_json_interchanges_with_sdk():
    from tinker.types._pydantic_types.datum import Datum as SdkWireDatum

    sdk_datum = SdkWireDatum(
        model_input=tinker.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [0.5, -1.0, 2.0]},
    )
    ours = types.Datum.model_validate_json(sdk_datum.model_dump_json())
    assert ours.model_input.to_ints() == [5, 6, 7]
    assert ours.loss_fn_inputs["weights"].tolist() == [0.5, -1.0, 2.0]
    back = type(sdk_datum).model_validate_json(ours.model_dump_json())
    assert back.model_dump() == sdk_datum.model_dump()


def test_ragged_lists_are_rejected():
    with pytest.raises(ValueError, match="rectangular"):
        types.Datum(
            model_input=types.ModelInput.from_ints([1, 2]),
            loss_fn_inputs={"target_tokens": [[1, 2], [3]]},
        )
