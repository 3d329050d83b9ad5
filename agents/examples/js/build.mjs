// Builds app.js into wordcount.wasm with componentize-js, against the WIT
// in WIT_DIR (default ../../../wit, the repository's).
import { componentize } from "@bytecodealliance/componentize-js";
import { writeFile } from "node:fs/promises";

const witPath = process.env.WIT_DIR || "../../../wit";
const out = process.env.OUT || "wordcount.wasm";
const { component } = await componentize({ sourcePath: "app.js", witPath, worldName: "agent" });
await writeFile(out, component);
console.log(`wrote ${out} (${component.length} bytes)`);
