"""What a lowered program holds: its collectives with the bytes they move per step, its ops and
custom calls. Read from the StableHLO module of `jax.stages.Lowered.compiler_ir()`, before any
compiler pass: the collectives are those the program states (inside `jax.shard_map`: the MoE
exchange, its all-gathers and reductions); the partitioner adds those of arrays sharded outside
it (a data-parallel gradient reduction, say) only when it compiles.

A collective in a function called twice, or in a loop of N steps (`jax.lax.scan`, `nn.scan`),
runs twice or N times a step; each branch of a conditional is counted once.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np
from jax.extend.mlir import ir

COLLECTIVES = ('all_to_all', 'ragged_all_to_all', 'all_gather', 'all_reduce', 'reduce_scatter',
               'collective_permute', 'collective_broadcast')
# Bytes leaving its devices, per byte of one device's operand, over a group of n devices: an
# all-to-all keeps 1/n of its operand; an all-gather sends it to the n - 1 others; an all-reduce
# (ring: reduce-scatter, then all-gather) sends 2 (n - 1) / n of it. A ragged all-to-all sends
# the rows routed elsewhere: at most its whole operand (its buffer of rows), as counted here.
_SENT_FRACTION = {
    'all_to_all': lambda n: (n - 1) / n,
    'ragged_all_to_all': lambda n: 1.0,
    'all_gather': lambda n: n - 1,
    'all_reduce': lambda n: 2 * (n - 1) / n,
    'reduce_scatter': lambda n: (n - 1) / n,
    'collective_permute': lambda n: 1.0,
    'collective_broadcast': lambda n: 1.0,
}


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op of the program.

  kind: one of COLLECTIVES. replica_groups: the devices that exchange together, [groups, n].
  operand: a device's data operand ('bf16[4, 8, 20, 128]'), operand_bytes its bytes.
  calls: how often it runs per step.
  """
  kind: str
  replica_groups: tuple[tuple[int, ...], ...]
  operand: str
  operand_bytes: int
  calls: int

  @property
  def group_size(self) -> int:
    return len(self.replica_groups[0])

  @property
  def bytes_per_step(self) -> int:
    """Bytes leaving their devices per step, summed over every device (a ragged all-to-all's:
    at most this)."""
    devices = sum(len(group) for group in self.replica_groups)
    sent = _SENT_FRACTION[self.kind](self.group_size) * self.operand_bytes
    return round(sent * devices * self.calls)


def module(lowered) -> ir.Module:
  """The StableHLO module of a `jax.stages.Lowered`."""
  return lowered.compiler_ir('stablehlo')


def collectives(program: ir.Module) -> list[Collective]:
  """Every collective that runs in a step of the program, in program order."""
  return [_collective(op, calls) for op, calls in _ops(program)
          if op.name.startswith('stablehlo.') and _kind(op) in COLLECTIVES]


def op_counts(program: ir.Module) -> collections.Counter:
  """How often each op runs per step: 'stablehlo.dot_general', 'chlo.ragged_dot' ..., and each
  custom call by its target ('custom_call @ragged_all_to_all')."""
  counts = collections.Counter()
  for op, calls in _ops(program):
    counts[op.name if op.name != 'stablehlo.custom_call'
           else f'custom_call @{_call_target(op)}'] += calls
  return counts


def host_callbacks(program: ir.Module) -> list[str]:
  """The custom calls that run Python on the host (`jax.pure_callback`, `jax.debug.print` ...)."""
  return sorted({_call_target(op) for op, _ in _ops(program) if op.name == 'stablehlo.custom_call'
                 and 'callback' in _call_target(op)})


def _ops(program: ir.Module):
  """(op, runs per step) of every op reached from @main: a called function's ops once per call,
  a loop's ops once per step of the loop."""
  functions = {ir.StringAttr(op.attributes['sym_name']).value: op.operation
               for op in program.body.operations if op.operation.name == 'func.func'}
  yield from _walk(functions['main'], 1, functions)


def _walk(op: ir.Operation, calls: int, functions: dict):
  # A loop's regions (its condition and its body) run once per step of the loop.
  runs = calls * _trip_count(op) if op.name == 'stablehlo.while' else calls
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        child = child.operation
        yield child, runs
        if child.name == 'func.call':
          yield from _walk(functions[ir.FlatSymbolRefAttr(child.attributes['callee']).value],
                           runs, functions)
        else:
          yield from _walk(child, runs, functions)


def _trip_count(loop: ir.Operation) -> int:
  """Steps of a counted loop (`while i < N`, i from a constant: what `scan` and `fori_loop`
  lower to); 1 when the count is not a constant of the program."""
  condition = loop.regions[0].blocks[0]
  for op in condition.operations:
    op = op.operation
    if op.name != 'stablehlo.compare' or 'LT' not in str(op.attributes['comparison_direction']):
      continue
    counter, bound = op.operands
    if not isinstance(counter, ir.BlockArgument):
      continue
    start = _constant(loop.operands[counter.arg_number])
    end = _constant(bound)
    if start is not None and end is not None:
      return max(end - start, 0)
  return 1


def _constant(value: ir.Value) -> int | None:
  """The integer of a scalar `stablehlo.constant`, else None."""
  owner = value.owner
  if not isinstance(owner, ir.OpView) or owner.operation.name != 'stablehlo.constant':
    return None
  match = re.match(r'dense<(-?\d+)>', str(owner.operation.attributes['value']))
  return int(match.group(1)) if match else None


def _kind(op: ir.Operation) -> str:
  """'all_to_all' of 'stablehlo.all_to_all'; a custom call's target ('ragged_all_to_all')."""
  name = op.name.split('.', 1)[-1]
  return _call_target(op) if name == 'custom_call' else name


def _call_target(op: ir.Operation) -> str:
  return ir.StringAttr(op.attributes['call_target_name']).value


def _collective(op: ir.Operation, calls: int) -> Collective:
  attributes = op.attributes
  if op.name == 'stablehlo.custom_call':  # ragged_all_to_all keeps its groups in its config
    attributes = ir.DictAttr(attributes['backend_config'])
  groups = np.asarray(ir.DenseIntElementsAttr(attributes['replica_groups'])).tolist()
  operand = ir.RankedTensorType(op.operands[0].type)
  return Collective(kind=_kind(op), replica_groups=tuple(map(tuple, groups)),
                    operand=_describe(operand), operand_bytes=_tensor_bytes(operand),
                    calls=calls)


def _element_bytes(element_type) -> int:
  """Bytes of one element ('bf16' 2, 'f32' 4, 'i1' 1)."""
  return max(1, int(re.search(r'\d+', str(element_type)).group()) // 8)


def _tensor_bytes(tensor: ir.RankedTensorType) -> int:
  return math.prod(tensor.shape) * _element_bytes(tensor.element_type)


def _describe(tensor: ir.RankedTensorType) -> str:
  return f'{tensor.element_type}[{", ".join(map(str, tensor.shape))}]'
