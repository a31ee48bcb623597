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
// num_predict 0 is no limit in Ollama (its runners stop at num_predict only when it is above 0), as -1 is;
// the end of the line stops each (greedy) answer, so that no limit is not a long run
const budget = async (num_predict) => {
  const options = { temperature: 0, num_predict, stop: ["\n"] };
  const g = await ollama.generate({ model, prompt: "import os\n\ndef cwd():\n    return ", raw: true, stream: false, options });
  const c = await ollama.chat({ model, messages: [{ role: "user", content: "What does os.path.join do?" }], stream: false, options });
  return { response: g.response, eval_count: g.eval_count, chat: c.message.content, chat_eval_count: c.eval_count };
};
out.num_predict = { zero: await budget(0), unlimited: await budget(-1), two: await budget(2) };
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
