"""The MoE layer and its stages: router, capacity, dispatch, experts, losses, stats."""

from .config import ROUTERS, MoEConfig
from .layer import MoEAux, MoELayer
from .router import Routing, build_router
from .stats import RoutingStats

__all__ = ["MoEConfig", "MoELayer", "MoEAux", "ROUTERS", "Routing", "RoutingStats", "build_router"]
