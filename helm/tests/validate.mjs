// Validates rendered Kubernetes objects offline against the Kubernetes API
// schemas, two ways:
//  1. kubernetes-models (the API's OpenAPI schemas compiled to validators;
//     @kubernetes-models/prometheus-operator for ServiceMonitor and
//     PrometheusRule): types, required fields, enums, formats;
//  2. the same package's TypeScript types, through the TypeScript compiler:
//     every object as a typed literal, so an unknown field (a typo such as
//     `readinesProbe`, which the API server would drop or refuse) fails too.
//   node helm/tests/validate.mjs OBJECTS.json
// OBJECTS.json: {"<value set>": [object, ...], ...}. Prints one line per
// object; exits 1 when any fails.
import { readFileSync, writeFileSync, mkdirSync, rmSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const sets = JSON.parse(readFileSync(process.argv[2], "utf8"));

// apiVersion -> the module holding its models.
function modulePath(apiVersion) {
  if (apiVersion.startsWith("monitoring.coreos.com/")) {
    return `@kubernetes-models/prometheus-operator/${apiVersion}`;
  }
  return `kubernetes-models/${apiVersion}`;
}

let failed = 0;
let passed = 0;
const typed = [];
for (const [set, objects] of Object.entries(sets)) {
  for (const obj of objects) {
    const what = `${set}: ${obj.apiVersion} ${obj.kind} ${obj.metadata?.name}`;
    let Model;
    try {
      Model = (await import(modulePath(obj.apiVersion)))[obj.kind];
    } catch (e) {
      Model = undefined;
    }
    if (!Model) {
      console.log(`FAIL ${what}: no schema for this apiVersion/kind`);
      failed++;
      continue;
    }
    try {
      new Model(obj).validate();
      console.log(`ok   ${what}`);
      passed++;
      typed.push({ what, obj, module: modulePath(obj.apiVersion) });
    } catch (e) {
      console.log(`FAIL ${what}: ${e.message}`);
      failed++;
    }
  }
}

// Unknown fields: each object as a literal of its interface; tsc's excess
// property check reports any field the API does not have.
const dir = join(here, ".typecheck");
rmSync(dir, { recursive: true, force: true });
mkdirSync(dir, { recursive: true });
const lines = [];
typed.forEach(({ obj, module }, i) => {
  lines.push(`import type { I${obj.kind} as T${i} } from "${module}/${obj.kind}";`);
});
typed.forEach(({ obj }, i) => {
  lines.push(`export const o${i}: T${i} = ${JSON.stringify(obj, null, 1)};`);
});
writeFileSync(join(dir, "objects.ts"), lines.join("\n") + "\n");
writeFileSync(
  join(dir, "tsconfig.json"),
  JSON.stringify({
    compilerOptions: {
      strict: true, noEmit: true, target: "es2022", module: "nodenext",
      moduleResolution: "nodenext", skipLibCheck: true, types: [],
    },
    files: ["objects.ts"],
  }),
);
try {
  execFileSync(process.execPath, [join(here, "node_modules/typescript/bin/tsc"), "-p", dir], {
    encoding: "utf8",
  });
  console.log(`ok   unknown-field check (TypeScript types of the same schemas) over ${typed.length} objects`);
  passed++;
} catch (e) {
  // tsc's lines name objects.ts(line,col): map them back to the objects.
  const src = readFileSync(join(dir, "objects.ts"), "utf8").split("\n");
  const out = (e.stdout || "") + (e.stderr || "");
  for (const l of out.split("\n").filter((l) => l.includes("error TS"))) {
    const m = l.match(/objects\.ts\((\d+),/);
    let owner = "";
    if (m) {
      for (let n = Number(m[1]) - 1; n >= 0; n--) {
        const d = src[n].match(/^export const o(\d+)/);
        if (d) {
          owner = typed[Number(d[1])].what;
          break;
        }
      }
    }
    console.log(`FAIL ${owner}: ${l.replace(/^.*error TS\d+: /, "")}`);
  }
  failed++;
}
rmSync(dir, { recursive: true, force: true });
console.log(`validate: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
