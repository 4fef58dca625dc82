/**
 * Authorization objects, as QEMU's authz-simple and authz-list
 * (qapi/authz.json): given an identity (for TLS, the client certificate's
 * distinguished name as GnuTLS prints it), allow or deny.
 */
import { type Members, arrayOf, enumOf, str, struct } from '../qapi/schema.js';

export interface Authz {
  readonly id: string;
  readonly qomType: string;
  isAllowed(identity: string): boolean;
}

type Policy = 'allow' | 'deny';
const POLICY = enumOf('QAuthZListPolicy', ['deny', 'allow']);

export const AUTHZ_SIMPLE_MEMBERS: Members = { identity: str };
export const AUTHZ_LIST_MEMBERS: Members = {
  '*policy': POLICY,
  '*rules': arrayOf(struct('QAuthZListRule', { match: str, policy: POLICY, '*format': enumOf('QAuthZListFormat', ['exact', 'glob']) })),
};

/** authz-simple: exactly one identity is allowed. */
export class AuthzSimple implements Authz {
  readonly qomType = 'authz-simple';
  constructor(
    readonly id: string,
    readonly identity: string,
  ) {}

  isAllowed(identity: string): boolean {
    return identity === this.identity;
  }
}

interface Rule {
  match: string;
  policy: Policy;
  format: 'exact' | 'glob';
}

/** authz-list: the first rule that matches decides; with none, the default policy (deny). */
export class AuthzList implements Authz {
  readonly qomType = 'authz-list';
  readonly policy: Policy;
  readonly rules: Rule[];

  constructor(
    readonly id: string,
    props: Record<string, unknown>,
  ) {
    this.policy = (props.policy as Policy | undefined) ?? 'deny';
    this.rules = ((props.rules as Array<Record<string, unknown>> | undefined) ?? []).map((r) => ({
      match: r.match as string,
      policy: r.policy as Policy,
      format: (r.format as 'exact' | 'glob' | undefined) ?? 'exact',
    }));
  }

  isAllowed(identity: string): boolean {
    for (const r of this.rules) {
      if (r.format === 'exact' ? r.match === identity : globMatch(r.match, identity)) return r.policy === 'allow';
    }
    return this.policy === 'allow';
  }
}

/**
 * Shell-style match with '*' (any run, '/' included) and '?' (one
 * character) and nothing else, as GLib's g_pattern_match_simple that QEMU
 * uses: no escapes, no brackets.
 */
export function globMatch(pattern: string, text: string): boolean {
  const p = [...pattern];
  const t = [...text];
  let pi = 0;
  let ti = 0;
  let star = -1;
  let mark = 0;
  while (ti < t.length) {
    if (pi < p.length && (p[pi] === '?' || p[pi] === t[ti])) {
      pi++;
      ti++;
    } else if (pi < p.length && p[pi] === '*') {
      star = pi++;
      mark = ti;
    } else if (star >= 0) {
      pi = star + 1;
      ti = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.length && p[pi] === '*') pi++;
  return pi === p.length;
}
