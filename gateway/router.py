"""Model ids and aliases -> the ordered deployments that can serve them."""

from __future__ import annotations

from dataclasses import dataclass

from .auth import Principal
from .config import Config, ModelConfig, ProviderConfig
from .errors import Forbidden, InvalidRequest, ModelNotFound


@dataclass(frozen=True, slots=True)
class Deployment:
    """One model at one provider: what a request is finally sent to."""

    id: str  # "provider/model", the public id
    provider: ProviderConfig
    model: ModelConfig

    @property
    def upstream_model(self) -> str:
        return self.model.upstream_name

    def supports(self, capability: str) -> bool:
        return capability in self.model.capabilities


@dataclass(frozen=True, slots=True)
class Route:
    """What a requested model name resolved to."""

    requested: str  # the name the client sent, echoed back in responses
    deployments: tuple[Deployment, ...]  # in fallback order


class Router:
    def __init__(self, config: Config) -> None:
        self.models: dict[str, Deployment] = {}
        for provider in config.active_providers():
            for model in provider.models:
                dep = Deployment(f"{provider.name}/{model.id}", provider, model)
                self.models[dep.id] = dep
        self.aliases: dict[str, tuple[Deployment, ...]] = {}
        self.weights: dict[str, tuple[float, ...]] = {}
        for alias, spec in config.aliases.items():
            active = [i for i, t in enumerate(spec.models) if t in self.models]
            if not active:  # an alias whose every provider is disabled does not exist
                continue
            self.aliases[alias] = tuple(self.models[spec.models[i]] for i in active)
            if spec.weights:
                self.weights[alias] = tuple(spec.weights[i] for i in active)

    def resolve(self, name: str, principal: Principal, capability: str) -> Route:
        """The deployments for a model id or alias that this principal may use.

        Unknown names are 404 `model_not_found`; known names the key may not use are 403.
        A model without the endpoint's capability is unknown to that endpoint, as in OpenAI.
        """
        dep = self.models.get(name)
        deps: tuple[Deployment, ...]
        if dep is not None:
            deps = (dep,)
            if not principal.may_use(name):
                raise Forbidden(f"This API key may not use the model '{name}'.", param="model")
        elif name in self.aliases:
            deps = tuple(
                d for d in self.aliases[name] if principal.may_use(name) or principal.may_use(d.id)
            )
            if not deps:
                raise Forbidden(f"This API key may not use the model '{name}'.", param="model")
        else:
            raise ModelNotFound(
                f"The model '{name}' does not exist or is not served by this gateway.",
                param="model",
            )
        usable = tuple(d for d in deps if d.supports(capability))
        if not usable:
            what = _ENDPOINT_NAMES.get(capability, capability)
            raise InvalidRequest(
                f"The model '{name}' does not support {what}.",
                param="model",
                code="model_not_supported",
            )
        return Route(name, usable)

    def visible_models(self, principal: Principal) -> list[Deployment]:
        return [d for d in self.models.values() if principal.may_use(d.id)]


_ENDPOINT_NAMES = {
    "chat": "chat completions",
    "embeddings": "embeddings",
    "images": "image generation",
    "speech": "speech synthesis",
}
