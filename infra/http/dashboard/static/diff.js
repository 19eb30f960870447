// A line diff (longest common subsequence) of two texts: [{op: "same"|"add"|"del", line}].
export function lineDiff(a, b) {
  const x = a.split("\n"), y = b.split("\n");
  const n = x.length, m = y.length;
  // Definitions are small (hundreds of lines): the O(n*m) table is fine and exact.
  const table = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      table[i][j] = x[i] === y[j] ? table[i + 1][j + 1] + 1 : Math.max(table[i + 1][j], table[i][j + 1]);
    }
  }
  const out = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { out.push({ op: "same", line: x[i] }); i++; j++; }
    else if (table[i + 1][j] >= table[i][j + 1]) out.push({ op: "del", line: x[i++] });
    else out.push({ op: "add", line: y[j++] });
  }
  while (i < n) out.push({ op: "del", line: x[i++] });
  while (j < m) out.push({ op: "add", line: y[j++] });
  return out;
}
