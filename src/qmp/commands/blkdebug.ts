/**
 * blkdebug at run time (vdisk's additions, x- as QEMU names unstable
 * commands): add rules to a live blkdebug node, list them with their
 * counters, remove them, and power a node on again after a power cut.
 */
import { blkdebugRules } from '../../block/filters/blkdebug.js';
import type { DebugControl } from '../../block/debug-control.js';
import { INJECT_ERROR, SET_STATE } from '../../block/drivers/index.js';
import type { Daemon } from '../../daemon.js';
import { VdiskError } from '../../errors.js';
import { int, str, struct } from '../../qapi/schema.js';
import type { QmpCommand } from '../server.js';

/** The debug control of a node by name (blkdebug is the node that has one). */
function debugControlOf(daemon: Daemon, name: string): DebugControl {
  const control = daemon.graph.find(name)?.debugControl;
  if (!control) throw new VdiskError('EINVAL', `Node '${name}' is not a blkdebug node`);
  return control;
}

const NODE = struct('BlkdebugNode', { node: str });

export const BLKDEBUG_COMMANDS: QmpCommand[] = [
  {
    name: 'x-blkdebug-add-rule',
    args: struct('x-blkdebug-add-rule', { node: str, '*inject-error': INJECT_ERROR, '*set-state': SET_STATE }),
    run: (a, { daemon }) => {
      const node = debugControlOf(daemon, a.node as string);
      const inject = a['inject-error'] as Record<string, unknown> | undefined;
      const set = a['set-state'] as Record<string, unknown> | undefined;
      if ((inject === undefined) === (set === undefined)) throw new VdiskError('EINVAL', "Need exactly one of 'inject-error' and 'set-state'");
      const [rule] = blkdebugRules(inject ? [inject] : [], set ? [set] : []);
      return { id: node.addRule(rule) };
    },
  },
  {
    name: 'x-blkdebug-query',
    args: NODE,
    run: (a, { daemon }) => {
      const node = debugControlOf(daemon, a.node as string);
      return {
        state: node.state,
        'powered-off': node.poweredOff,
        rules: node.rules.map((r) =>
          r.kind === 'set-state'
            ? { id: r.id, type: 'set-state', event: r.event, state: r.state, new_state: r.newState, hits: r.hits }
            : { id: r.id, type: 'inject-error', event: r.event, state: r.state, iotype: r.iotypes, errno: r.errno, sector: r.sector, once: r.once, action: r.action, 'delay-ms': r.delayMs, hits: r.hits, injected: r.injected },
        ),
      };
    },
  },
  {
    name: 'x-blkdebug-remove-rule',
    args: struct('x-blkdebug-remove-rule', { node: str, id: int('int') }),
    run: (a, { daemon }) => (debugControlOf(daemon, a.node as string).removeRule(a.id as number), {}),
  },
  {
    name: 'x-blkdebug-power-on',
    args: NODE,
    run: (a, { daemon }) => (debugControlOf(daemon, a.node as string).powerOn(), {}),
  },
];
