#!/usr/bin/env node
// Send one Dispatch job from Node.js with amqplib, wait for its final reply, save the result zip.
//
// Usage: node submit.js URL POOL OUTPUT.zip       (WAIT_S bounds the wait, default 300)
// Each reply's headers go to stderr; a JSON summary goes to stdout:
//   {"jobId":"node-…","state":"Exited","exitCode":0,"host":"…","result":"OUTPUT.zip"}
// Exits 0 when the job exited with code 0, 1 otherwise, 2 on a usage error.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const amqp = require('amqplib');
const AdmZip = require('adm-zip');

const JOBS_EXCHANGE = 'dispatch.jobs';
const FINAL_STATES = new Set(['Exited', 'Rejected', 'Removed']);
const REPLY_QUEUE_EXPIRES_MS = 24 * 3600 * 1000;

// The job: print $GREETING, then its stdin (input.txt, shipped in the body) in capitals.
const JOB_HEADERS = {
  Cmd: '/bin/sh',
  Arguments: ['-c', 'echo "$GREETING"; tr a-z A-Z'], // an array: no shell-like splitting
  Environment: { GREETING: 'hello from node' }, // a table
  In: 'input.txt', // a file of the input zip, fed to stdin
  RequestCpus: 1, // a number: amqplib sends an integer
  JobName: 'node-example',
};
const INPUT_TEXT = 'dispatch from node\n';

function inputZip() {
  const zip = new AdmZip();
  zip.addFile('input.txt', Buffer.from(INPUT_TEXT, 'utf8'));
  return zip.toBuffer();
}

// Resolve with the first final reply carrying our correlation id; ack the others as they come.
function finalReply(ch, queue, correlationId) {
  return new Promise((resolve, reject) => {
    ch.consume(queue, (msg) => {
      if (msg === null) return reject(new Error(`consumer of ${queue} was cancelled`));
      const headers = msg.properties.headers || {};
      console.error(`reply: ${JSON.stringify(headers)}`);
      const final = msg.properties.correlationId === correlationId && FINAL_STATES.has(headers.JobState);
      if (final) resolve(msg); // acked once the result is on disk
      else ch.ack(msg);
    }).catch(reject);
  });
}

// Publish with mandatory + a confirm, so a pool nobody serves is an error, not a silent loss.
function publishJob(ch, pool, props) {
  return new Promise((resolve, reject) => {
    ch.once('return', () => reject(new Error(`no queue is bound for pool ${pool}; start a worker`)));
    const options = { ...props, persistent: true, mandatory: true, contentType: 'application/zip' };
    ch.publish(JOBS_EXCHANGE, pool, inputZip(), options, (err) => (err ? reject(err) : resolve()));
  });
}

function timeout(seconds) {
  let timer;
  const promise = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no final reply within ${seconds}s`)), seconds * 1000);
  });
  return { promise, cancel: () => clearTimeout(timer) };
}

async function main([url, pool, output]) {
  if (!output) {
    console.error('usage: node submit.js URL POOL OUTPUT.zip');
    return 2;
  }
  const jobId = `node-${crypto.randomBytes(6).toString('hex')}`;
  const correlationId = crypto.randomUUID();
  const replyQueue = `dispatch.reply.${jobId}`;
  const conn = await amqp.connect(url);
  const limit = timeout(Number(process.env.WAIT_S || 300));
  try {
    const ch = await conn.createConfirmChannel();
    // Durable, so replies wait for us across a reconnect; x-expires cleans up if we never return.
    await ch.assertQueue(replyQueue, {
      durable: true,
      arguments: { 'x-expires': REPLY_QUEUE_EXPIRES_MS },
    });
    const reply = finalReply(ch, replyQueue, correlationId);
    const props = { messageId: jobId, correlationId, replyTo: replyQueue, priority: 5, headers: JOB_HEADERS };
    await publishJob(ch, pool, props);
    const msg = await Promise.race([reply, limit.promise]);
    const headers = msg.properties.headers;
    if (msg.content.length) fs.writeFileSync(output, msg.content);
    ch.ack(msg);
    await ch.deleteQueue(replyQueue);
    const summary = {
      jobId: headers.JobId,
      state: headers.JobState,
      exitCode: headers.ExitCode ?? null,
      host: headers.RemoteHost ?? null,
      result: msg.content.length ? output : null,
    };
    if (headers.Reason) summary.reason = headers.Reason;
    console.log(JSON.stringify(summary));
    return summary.state === 'Exited' && summary.exitCode === 0 ? 0 : 1;
  } finally {
    limit.cancel();
    await conn.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error(`error: ${err.message}`);
    process.exitCode = 1;
  },
);
