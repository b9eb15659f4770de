"""langchain-ollama and langchain-openai against a live server (tiny random-weight models):
with_structured_output (JSON schema and function calling), bind_tools, and the embedding
classes (OllamaEmbeddings, OpenAIEmbeddings) on an encoder and on a generative model."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic
import pytest
from live_server import Server

langchain_ollama = pytest.importorskip("langchain_ollama")
langchain_openai = pytest.importorskip("langchain_openai")


class Pet(pydantic.BaseModel):
    """A pet."""

    model_config = pydantic.ConfigDict(extra="forbid")
    kind: Literal["cat", "dog"]
    legs: int = pydantic.Field(ge=0, le=8)
    name: str = pydantic.Field(max_length=5)


def test_ollama_structured_output(tiny_server: Server) -> None:
    llm = langchain_ollama.ChatOllama(model="tiny", base_url=tiny_server.url, num_predict=200, seed=3)
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("Describe a pet.")
    assert isinstance(pet, Pet)
    reply = llm.bind_tools([Pet]).invoke("Describe a pet.")  # auto: random weights answer in text
    assert reply.type == "ai"


def test_openai_structured_output_and_forced_tool(tiny_server: Server) -> None:
    llm = langchain_openai.ChatOpenAI(
        model="tiny",
        base_url=tiny_server.url + "/v1",
        api_key="unused",
        max_tokens=200,
        seed=4,
        max_retries=0,
    )
    assert isinstance(llm.with_structured_output(Pet, method="json_schema").invoke("A pet?"), Pet)
    assert isinstance(llm.with_structured_output(Pet, method="function_calling").invoke("A pet?"), Pet)
    msg = llm.bind_tools([Pet], tool_choice="Pet").invoke("A pet?")
    (call,) = msg.tool_calls
    assert call["name"] == "Pet"
    Pet.model_validate(call["args"])


DOCS = ["the quick brown fox", "embeddings map text to vectors", "hello world"]
QUERY = "a lazy dog"


@pytest.mark.parametrize(("server_fixture", "model"), [("bert_server", "tiny-bert"), ("tiny_server", "tiny")])
def test_embedding_classes_equal_api_embed(
    request: pytest.FixtureRequest, server_fixture: str, model: str
) -> None:
    server: Server = request.getfixturevalue(server_fixture)
    with server.client() as c:
        want = np.array(
            c.post("/api/embed", json={"model": model, "input": [*DOCS, QUERY]}).json()["embeddings"]
        )
    ollama = langchain_ollama.OllamaEmbeddings(model=model, base_url=server.url)
    np.testing.assert_allclose(ollama.embed_documents(DOCS), want[:3], atol=1e-5)
    np.testing.assert_allclose(ollama.embed_query(QUERY), want[3], atol=1e-5)
    # check_embedding_ctx_length=False sends the text: by default the class encodes it with
    # tiktoken's cl100k_base (downloaded on first use) and sends those ids, which are not this
    # model's vocabulary (README, "Embeddings").
    openai = langchain_openai.OpenAIEmbeddings(
        model=model,
        base_url=server.url + "/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    np.testing.assert_allclose(openai.embed_documents(DOCS), want[:3], atol=1e-5)
    np.testing.assert_allclose(openai.embed_query(QUERY), want[3], atol=1e-5)
