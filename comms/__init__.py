"""loom.comms: who talks to whom, and a record of every message.

The only door to torch.distributed in loom.  Every op here appends a
`CommRecord` to a per-process ring buffer (see `records`).
"""
from .agree import Agreement, RemoteError, agree
from .elastic import elastic_attempt, init_process_group_from_env
from .mesh import Mesh, init_mesh, mesh_layout
from .ops import (
    agreed,
    Pending,
    all_gather,
    all_gather_into,
    all_gather_with_grad,
    all_reduce,
    all_reduce_with_grad,
    all_to_all_v,
    all_to_all_v_with_grad,
    background_groups,
    barrier,
    broadcast,
    destroy_group,
    exchange_counts,
    group_ranks,
    is_background,
    irecv,
    isend,
    new_group,
    recv,
    reduce_scatter,
    reduce_scatter_into,
    reduce_scatter_with_grad,
    register_group,
    send,
    set_collective_checks,
    set_send_hook,
    wait_all,
)
from .placement import Sharded, placement_of, set_placement
from .ring import Ring, world_ranks
from .scan import all_scan
from .trace import CommRecord, TraceReader, background_wait, records, reset_trace, set_step

__all__ = [
    "Agreement", "CommRecord", "agreed", "background_wait", "Mesh", "RemoteError", "agree", "set_collective_checks",
    "Pending", "all_gather", "all_gather_into", "all_scan", "all_gather_with_grad", "all_reduce",
    "all_reduce_with_grad", "all_to_all_v", "background_groups", "is_background", "all_to_all_v_with_grad", "barrier",
    "broadcast", "destroy_group",
    "exchange_counts", "group_ranks", "init_mesh", "irecv", "isend", "mesh_layout", "new_group", "records",
    "recv", "reduce_scatter", "reduce_scatter_into", "reduce_scatter_with_grad", "register_group", "reset_trace",
    "Ring", "Sharded", "placement_of", "send", "set_placement", "set_send_hook", "set_step", "TraceReader", "wait_all",
    "world_ranks", "elastic_attempt", "init_process_group_from_env",
]
