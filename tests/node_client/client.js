#!/usr/bin/env node
// A Fleet client written from proto/fedgen/v1/*.proto alone: no generated code, no Python.
//
//   node client.js ADDRESS ENROLLMENT_TOKEN [--timeout-s 60] [--first-chunk-bytes 1024]
//                  [--proto-dir DIR] [--platform TEXT]
//
// It joins, long-polls PollTask until a TRAIN task arrives, downloads the task's global model
// in two calls (the first stopped after one small chunk, the second resuming at that offset),
// verifies its length and sha256, sends a Heartbeat, makes a few deliberately bad calls and
// records the status each one got, then leaves. Refusals that mean "try later" are retried with
// backoff and jitter, honouring the server's pushback. It prints one JSON line on stdout; exit status
// 0 = every step and every bad call behaved as fleet.proto documents, 1 = a step failed
// (message on stderr), 2 = bad command line, 3 = a bad call got an unexpected status.
'use strict';

const crypto = require('crypto');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const USAGE = 'usage: node client.js ADDRESS ENROLLMENT_TOKEN [--timeout-s N] [--first-chunk-bytes N] ' +
  '[--proto-dir DIR] [--platform TEXT]';

class StepError extends Error {}

function parseArgs(argv) {
  const positional = [];
  const opts = {
    timeoutS: 60,
    firstChunkBytes: 1024,
    protoDir: path.resolve(__dirname, '..', '..', 'proto'),
    platform: `node-${process.version} ${process.platform}-${process.arch} grpc-js`,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usageError(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '--timeout-s') opts.timeoutS = Number(next());
    else if (arg === '--first-chunk-bytes') opts.firstChunkBytes = Number(next());
    else if (arg === '--proto-dir') opts.protoDir = path.resolve(next());
    else if (arg === '--platform') opts.platform = next();
    else if (arg === '-h' || arg === '--help') { process.stdout.write(USAGE + '\n'); process.exit(0); }
    else if (arg.startsWith('--')) usageError(`unknown option ${arg}`);
    else positional.push(arg);
  }
  if (positional.length !== 2) usageError('need ADDRESS and ENROLLMENT_TOKEN');
  if (!(opts.timeoutS > 0)) usageError('--timeout-s must be a positive number');
  if (!Number.isInteger(opts.firstChunkBytes) || opts.firstChunkBytes < 1) {
    usageError('--first-chunk-bytes must be a positive integer');
  }
  [opts.address, opts.token] = positional;
  return opts;
}

function usageError(message) {
  process.stderr.write(`client.js: ${message}\n${USAGE}\n`);
  process.exit(2);
}

function loadFleet(protoDir) {
  const definition = protoLoader.loadSync('fedgen/v1/fleet.proto', {
    includeDirs: [protoDir],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition);
  if (!pkg.fedgen || !pkg.fedgen.v1 || !pkg.fedgen.v1.Fleet) {
    throw new StepError(`fedgen.v1.Fleet not found in ${path.join(protoDir, 'fedgen/v1/fleet.proto')}`);
  }
  return pkg.fedgen.v1.Fleet;
}

function bearer(credential) {
  const md = new grpc.Metadata();
  md.set('authorization', `Bearer ${credential}`);
  return md;
}

function codeName(code) {
  return grpc.status[code] !== undefined ? String(grpc.status[code]) : `CODE_${code}`;
}

// uint64 fields arrive as decimal strings (longs: String); sizes here are far below 2**53.
function toSafeInt(value, what) {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) throw new StepError(`${what} is not a usable size: ${value}`);
  return n;
}

// "Try later" refusals, retried as the Python clients do (fedgen.core.retry): exponential backoff
// with full jitter, and the server's grpc-retry-pushback-ms trailer (gRFC A6) as a floor.
const TRY_LATER = new Set([grpc.status.UNAVAILABLE, grpc.status.CANCELLED, grpc.status.DEADLINE_EXCEEDED]);
const OVERLOAD_DETAILS = ['Too many pending requests', 'Concurrent RPC limit exceeded'];
const BACKOFF = { initialMs: 500, maxMs: 15000, multiplier: 2 };

function pushbackMs(err) {
  const values = err && err.metadata ? err.metadata.get('grpc-retry-pushback-ms') : [];
  const text = values.length ? String(values[0]) : '';
  return /^[0-9]+$/.test(text) ? Number(text) : null;
}

// Milliseconds to wait before retrying `err`'s call, or null when retrying cannot help.
function retryDelayMs(err, attempt) {
  if (!err || typeof err.code !== 'number') return null;
  const pushback = pushbackMs(err);
  if (pushback !== null && (TRY_LATER.has(err.code) || err.code === grpc.status.RESOURCE_EXHAUSTED)) {
    return Math.min(BACKOFF.maxMs, pushback) * (1 + Math.random() / 2);
  }
  const overload = err.code === grpc.status.RESOURCE_EXHAUSTED &&
    OVERLOAD_DETAILS.some((d) => (err.details || '').includes(d));
  if (TRY_LATER.has(err.code) || overload) {
    return Math.random() * Math.min(BACKOFF.maxMs, BACKOFF.initialMs * BACKOFF.multiplier ** attempt);
  }
  return null;
}

class Fleet {
  constructor(Service, address, deadlineAt) {
    this.client = new Service(address, grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': 4 * 1024 * 1024,
      'grpc.max_send_message_length': 4 * 1024 * 1024,
    });
    this.deadlineAt = deadlineAt; // overall budget, ms since epoch
    this.retries = {}; // status name -> calls refused with "try later" and retried
  }

  // Runs `attempt` (a function returning a promise) until it succeeds, fails for a reason
  // retrying cannot fix, or the overall budget would be spent waiting.
  async withRetry(attempt) {
    for (let n = 0; ; n++) {
      try {
        return await attempt();
      } catch (err) {
        const delay = retryDelayMs(err, n);
        if (delay === null || this.remainingMs() < delay + 1000) throw err;
        const name = codeName(err.code);
        this.retries[name] = (this.retries[name] || 0) + 1;
        await sleep(delay);
      }
    }
  }

  // A call's deadline: `ms` from now, never past the overall budget.
  deadline(ms) {
    return new Date(Math.min(Date.now() + ms, this.deadlineAt));
  }

  remainingMs() {
    return this.deadlineAt - Date.now();
  }

  unary(method, request, metadata, callMs = 15000) {
    return this.withRetry(() => new Promise((resolve, reject) => {
      this.client[method](request, metadata || new grpc.Metadata(), { deadline: this.deadline(callMs) },
        (err, response) => (err ? reject(err) : resolve(response)));
    }));
  }

  // Server stream: resolves with the chunks received. With `stopAfterOne`, cancels the call
  // after the first chunk (what an interrupted download looks like to the server).
  download(request, metadata, options = {}) {
    return this.withRetry(() => this.downloadOnce(request, metadata, options));
  }

  downloadOnce(request, metadata, { stopAfterOne = false, callMs = 30000 } = {}) {
    return new Promise((resolve, reject) => {
      const chunks = [];
      let cancelled = false;
      let settled = false;
      const settle = (fn, value) => { if (!settled) { settled = true; fn(value); } };
      const call = this.client.DownloadArtifact(request, metadata, { deadline: this.deadline(callMs) });
      call.on('data', (chunk) => {
        if (cancelled) return; // messages already in flight when we hung up
        chunks.push(chunk);
        if (stopAfterOne) {
          cancelled = true;
          call.cancel();
          settle(resolve, chunks);
        }
      });
      call.on('error', (err) => {
        if (cancelled && err.code === grpc.status.CANCELLED) settle(resolve, chunks);
        else settle(reject, err);
      });
      call.on('end', () => settle(resolve, chunks));
    });
  }

  close() {
    this.client.close();
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function step(name, fn) {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof StepError) throw new StepError(`${name}: ${err.message}`);
    if (err && typeof err.code === 'number') {
      throw new StepError(`${name} failed: ${codeName(err.code)}: ${err.details || err.message}`);
    }
    throw err;
  }
}

// Runs a call that must fail; returns {code, details} of what it got (code "OK" if it succeeded).
async function badCall(fn) {
  try {
    await fn();
    return { code: 'OK', details: '' };
  } catch (err) {
    if (err && typeof err.code === 'number') return { code: codeName(err.code), details: err.details || '' };
    throw err;
  }
}

async function pollForTrain(fleet, auth) {
  let polls = 0;
  let waits = 0;
  for (;;) {
    const remaining = fleet.remainingMs();
    if (remaining <= 1000) throw new StepError(`no TRAIN task after ${polls} polls (${waits} WAIT answers)`);
    // Ask the server to hold the call at most 5 s, and never past our own budget.
    const maxWaitMs = Math.max(100, Math.min(5000, remaining - 1000));
    polls += 1;
    const task = await fleet.unary('PollTask', { max_wait_ms: maxWaitMs }, auth, maxWaitMs + 10000);
    if (task.kind === 'train') return { task: task.train, polls, waits };
    if (task.kind === 'done') throw new StepError(`got DONE before any TRAIN task: ${task.done.reason}`);
    if (task.kind !== 'wait') throw new StepError(`Task has no kind set: ${JSON.stringify(task)}`);
    waits += 1;
    const retryMs = Math.min(task.wait.retry_after_ms || 100, Math.max(0, fleet.remainingMs() - 1000));
    await sleep(retryMs);
  }
}

function checkChunks(chunks, artifactId, expectedOffset, size) {
  let offset = expectedOffset;
  for (const c of chunks) {
    if (c.artifact_id !== artifactId) throw new StepError(`chunk names artifact ${c.artifact_id}, asked for ${artifactId}`);
    if (toSafeInt(c.offset, 'chunk offset') !== offset) throw new StepError(`chunk at offset ${c.offset}, expected ${offset}`);
    if (toSafeInt(c.total_size, 'chunk total_size') !== size) {
      throw new StepError(`chunk says total_size ${c.total_size}, the task's ArtifactRef says ${size}`);
    }
    offset += c.data.length;
  }
  return offset;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const deadlineAt = Date.now() + opts.timeoutS * 1000;
  // Hard stop: whatever happens, the process does not outlive its budget by much.
  setTimeout(() => {
    process.stderr.write(`client.js: gave up after --timeout-s ${opts.timeoutS}\n`);
    process.exit(1);
  }, opts.timeoutS * 1000 + 5000).unref();

  const Service = loadFleet(opts.protoDir);
  const fleet = new Fleet(Service, opts.address, deadlineAt);
  const badCalls = {};
  try {
    // 1. Join: enrollment token + device profile -> client id + credential.
    const joined = await step('Join', () => fleet.unary('Join', {
      enrollment_token: opts.token,
      profile: {
        memory_budget_mb: 256,
        link_down_bps: '10000000',
        link_up_bps: '2000000',
        supported_encodings: [],
        platform: opts.platform,
        num_examples: '600',
      },
    }));
    if (!joined.client_id || !joined.credential) throw new StepError(`Join answered no client id or credential: ${JSON.stringify(joined)}`);
    const auth = bearer(joined.credential);

    // 2. Long poll until TRAIN.
    const { task, polls, waits } = await step('PollTask', () => pollForTrain(fleet, auth));
    const ref = task.global_model;
    if (!ref || !/^[0-9a-f]{64}$/.test(ref.artifact_id)) throw new StepError(`TRAIN task has no usable global_model: ${JSON.stringify(ref)}`);
    if (ref.kind !== 'ARTIFACT_KIND_GLOBAL_MODEL') throw new StepError(`global_model has kind ${ref.kind}`);
    const size = toSafeInt(ref.size_bytes, 'global_model.size_bytes');
    if (size <= opts.firstChunkBytes) throw new StepError(`artifact of ${size} bytes is too small to test a resumed download`);

    // 3. Download in two calls: one small chunk, hang up, resume from where it stopped.
    const first = await step('DownloadArtifact (first part)', () => fleet.download(
      { artifact_id: ref.artifact_id, offset: '0', max_chunk_bytes: opts.firstChunkBytes }, auth, { stopAfterOne: true }));
    if (first.length !== 1) throw new StepError(`first DownloadArtifact call gave ${first.length} chunks, wanted 1`);
    if (first[0].data.length < 1 || first[0].data.length > opts.firstChunkBytes) {
      throw new StepError(`first chunk has ${first[0].data.length} bytes; max_chunk_bytes was ${opts.firstChunkBytes}`);
    }
    const resumedAt = checkChunks(first, ref.artifact_id, 0, size);
    const rest = await step('DownloadArtifact (resume)', () => fleet.download(
      { artifact_id: ref.artifact_id, offset: String(resumedAt), max_chunk_bytes: 0 }, auth));
    const end = checkChunks(rest, ref.artifact_id, resumedAt, size);
    const data = Buffer.concat([...first, ...rest].map((c) => c.data));
    if (end !== data.length) throw new StepError('chunk offsets do not add up');
    const sha256 = crypto.createHash('sha256').update(data).digest('hex');

    // 4. Heartbeat while "busy".
    const beat = await step('Heartbeat', () => fleet.unary('Heartbeat', { busy: true }, auth));

    // 5. Deliberately bad calls: each must get the status fleet.proto documents.
    const expected = {
      join_bad_token: 'UNAUTHENTICATED',
      poll_wrong_credential: 'UNAUTHENTICATED',
      poll_no_credential: 'UNAUTHENTICATED',
      download_unknown_artifact: 'NOT_FOUND',
      download_offset_past_end: 'OUT_OF_RANGE',
      heartbeat_after_leave: 'UNAUTHENTICATED',
    };
    badCalls.join_bad_token = await badCall(() => fleet.unary('Join', {
      enrollment_token: `${opts.token}-not-valid`, profile: { platform: opts.platform } }));
    badCalls.poll_wrong_credential = await badCall(() => fleet.unary('PollTask', { max_wait_ms: 0 },
      bearer(`${joined.client_id}.this-is-not-the-credential`)));
    badCalls.poll_no_credential = await badCall(() => fleet.unary('PollTask', { max_wait_ms: 0 }, new grpc.Metadata()));
    badCalls.download_unknown_artifact = await badCall(() => fleet.download(
      { artifact_id: '0'.repeat(64), offset: '0', max_chunk_bytes: 0 }, auth));
    badCalls.download_offset_past_end = await badCall(() => fleet.download(
      { artifact_id: ref.artifact_id, offset: String(size + 1), max_chunk_bytes: 0 }, auth));

    // 6. Leave; the credential must stop working.
    await step('Leave', () => fleet.unary('Leave', { reason: 'node client test done' }, auth));
    badCalls.heartbeat_after_leave = await badCall(() => fleet.unary('Heartbeat', { busy: false }, auth));

    const result = {
      client_id: joined.client_id,
      federation_id: joined.federation_id,
      heartbeat_interval_ms: joined.heartbeat_interval_ms,
      round: toSafeInt(task.round, 'task.round'),
      task_id: task.task_id,
      strategy: task.config ? task.config.strategy : '',
      polls,
      waits,
      artifact_id: ref.artifact_id,
      artifact_kind: ref.kind,
      size_bytes: size,
      bytes: data.length,
      sha256,
      sha256_ok: sha256 === ref.artifact_id && data.length === size,
      first_chunk_bytes: first[0].data.length,
      resumed_at: resumedAt,
      resume_chunks: rest.length,
      heartbeat_round: toSafeInt(beat.current_round, 'current_round'),
      bad_calls: badCalls,
      retries: fleet.retries,
    };
    process.stdout.write(JSON.stringify(result) + '\n');

    if (!result.sha256_ok) {
      throw new StepError(`downloaded ${data.length} bytes with sha256 ${sha256}; expected ${size} bytes, ${ref.artifact_id}`);
    }
    const wrong = Object.entries(expected).filter(([k, code]) => badCalls[k].code !== code)
      .map(([k, code]) => `${k}: expected ${code}, got ${badCalls[k].code} (${badCalls[k].details})`);
    if (wrong.length) {
      process.stderr.write(`client.js: bad calls answered the wrong status:\n  ${wrong.join('\n  ')}\n`);
      return 3;
    }
    return 0;
  } finally {
    fleet.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    const message = err instanceof StepError ? err.message : (err && err.stack) || String(err);
    process.stderr.write(`client.js: ${message}\n`);
    process.exit(1);
  },
);
