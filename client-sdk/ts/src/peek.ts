/**
 * What can be read of a `message` frame that does not decode (`JSON.parse`
 * refuses it): its channel and position, so the client can report it and
 * count it as received instead of taking the next message for a gap.
 */
export interface MessageHead {
  channel?: string;
  seq?: number;
  epoch?: string;
}

/** Index just after the string whose opening quote is at `i - 1`. */
function stringEnd(t: string, i: number): number {
  while (i < t.length) {
    const c = t.charCodeAt(i);
    if (c === 92) i += 2; // backslash: skip the escaped character
    else if (c === 34) return i + 1; // closing quote
    else i++;
  }
  return t.length;
}

const isDigit = (c: string) => c >= '0' && c <= '9';

/**
 * Reads the top-level `type`, `channel`, `seq` and `epoch` of a JSON object
 * without parsing (or validating) the rest, at any depth. `null` when the
 * text is not an object whose `type` is `"message"`; a field that cannot be
 * read is absent.
 */
export function peekMessage(text: string): MessageHead | null {
  let type: string | undefined;
  const head: MessageHead = {};
  let depth = 0;
  let expectKey = false;
  let key: string | undefined;
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (depth === 0 && c !== '{' && c.trim()) return null; // not an object
    if (c === '"') {
      const end = stringEnd(text, i + 1);
      if (depth === 1) {
        let s: unknown;
        try {
          s = JSON.parse(text.slice(i, end));
        } catch {
          s = undefined;
        }
        if (expectKey) {
          expectKey = false;
          key = typeof s === 'string' ? s : undefined;
        } else if (typeof s === 'string') {
          if (key === 'type') type = s;
          else if (key === 'channel') head.channel = s;
          else if (key === 'epoch') head.epoch = s;
          key = undefined;
        }
      }
      i = end;
      continue;
    }
    if (depth === 1 && isDigit(c)) {
      let end = i;
      while (end < text.length && isDigit(text[end])) end++;
      const n = Number(text.slice(i, end));
      if (key === 'seq' && Number.isSafeInteger(n)) head.seq = n;
      key = undefined;
      i = end;
      continue;
    }
    if (c === '{' || c === '[') {
      depth++;
      key = undefined;
      expectKey = depth === 1;
    } else if (c === '}' || c === ']') {
      if (--depth <= 0) break;
    } else if (depth === 1 && c === ',') {
      expectKey = true;
      key = undefined;
    } else if (depth === 1 && c === '-') {
      key = undefined; // a negative number is no `seq`
    }
    i++;
  }
  return type === 'message' ? head : null;
}
