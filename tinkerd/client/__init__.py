from tinkerd.client.futures import APIFuture
from tinkerd.client.rest_client import RestClient
from tinkerd.client.sampling_client import SamplingClient
from tinkerd.client.service_client import ServiceClient
from tinkerd.client.training_client import TrainingClient

__all__ = ["APIFuture", "RestClient", "SamplingClient", "ServiceClient", "TrainingClient"]
