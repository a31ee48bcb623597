// ollama-js against a codemoat server: show, generate with a suffix (FIM), streamed chat.
// Usage: CODEMOAT_URL=... CODEMOAT_TOKEN=... CODEMOAT_MODEL=... node ollama_client.mjs; prints one JSON object.
import { Ollama } from "ollama";

const model = process.env.CODEMOAT_MODEL;
const ollama = new Ollama({ host: process.env.CODEMOAT_URL, headers: { Authorization: `Bearer ${process.env.CODEMOAT_TOKEN}` } });
const out = {};
out.tags = (await ollama.list()).models.map((m) => m.name);
const show = await ollama.show({ model });
out.show = { template: show.template, capabilities: show.capabilities };
const gen = await ollama.generate({
  model, prompt: "import os\n\ndef cwd():\n    return ", suffix: "\n", raw: true, stream: false,
  options: { temperature: 0, num_predict: 16, stop: ["\n\n"] },
});
out.generate = { model: gen.model, response: gen.response, done: gen.done, eval_count: gen.eval_count };
const parts = [];
let last = null;
for await (const part of await ollama.chat({ model, messages: [{ role: "user", content: "What does os.path.join do?" }], stream: true, options: { temperature: 0, num_predict: 24 } })) {
  parts.push(part.message.content);
  last = part;
}
out.chat = { pieces: parts.length, text: parts.join(""), done: last.done, done_reason: last.done_reason, model: last.model };
try {
  await new Ollama({ host: process.env.CODEMOAT_URL, headers: { Authorization: "Bearer cm_wrong" } }).show({ model });
  out.wrong_token = "accepted";
} catch (e) {
  out.wrong_token = { status: e.status_code, error: e.error };
}
console.log(JSON.stringify(out));
