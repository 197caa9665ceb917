// A till in Node.js reading pointauth's error details (AIP-193).
//
//   npm ci && GOOGLE_PROTOS=DIR node error_details.js 127.0.0.1:50051 9100000000000001
//
// A refused call carries a google.rpc.Status, serialized, in the `grpc-status-details-bin`
// trailer. Its `details` are Any messages: always one google.rpc.ErrorInfo (the `reason` to
// branch on), and a google.rpc.BadRequest naming every bad field when the input was wrong.
// google/rpc/*.proto come from googleapis (see proto/README.md): GOOGLE_PROTOS names the folder
// that holds google/rpc/, e.g. a googleapis checkout or the site-packages folder of the Python
// package googleapis-common-protos, which ships them.
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const definition = protoLoader.loadSync(
  ['pointauth/v1/points_service.proto', 'google/rpc/status.proto', 'google/rpc/error_details.proto'],
  {
    includeDirs: [path.join(__dirname, '..', '..', '..', 'proto'), process.env.GOOGLE_PROTOS ?? 'googleapis'],
    keepCase: true, // field names as in the .proto files, as in error details' field paths
    longs: String, // int64 points: strings, so nothing above 2^53 loses precision
    enums: String,
  },
);
const { PointsService } = grpc.loadPackageDefinition(definition).pointauth.v1;

/** The error's details, each decoded by its type name, e.g. ['google.rpc.ErrorInfo', {...}]. */
function errorDetails(error) {
  const [raw] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!raw) return []; // not from pointauth's handlers (e.g. the server could not be reached)
  const status = definition['google.rpc.Status'].deserialize(raw);
  // Empty repeated and map fields are absent from decoded messages, hence the `?? []`.
  return (status.details ?? []).map((any) => {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const type = definition[name];
    return [name, type ? type.deserialize(any.value) : any.value];
  });
}

function report(what, error) {
  if (error.code === undefined) throw error; // not a gRPC error
  console.log(`${what}: ${grpc.status[error.code]}`);
  for (const [name, detail] of errorDetails(error)) {
    if (name === 'google.rpc.ErrorInfo') {
      console.log(`  reason ${detail.reason} (${detail.domain}) ${JSON.stringify(detail.metadata ?? {})}`);
    } else if (name === 'google.rpc.BadRequest') {
      for (const violation of detail.field_violations ?? []) {
        console.log(`  field ${violation.field}: ${violation.description}`);
      }
    } else {
      console.log(`  ${name}`);
    }
  }
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 10_000 }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

async function main(address, cardNumber) {
  const client = new PointsService(address, grpc.credentials.createInsecure());
  const till = { company_id: 'acme', store_id: 'store-1', terminal_id: 'till-1', channel: 'CHANNEL_STORE' };
  try {
    const { balance } = await call(client, 'GetBalance', { card_number: cardNumber });
    const points = (BigInt(balance.available_points) + 1n).toString();
    console.log(`card ${cardNumber}: ${balance.available_points} points available; asking for ${points}`);
    try {
      await call(client, 'AuthorizeHold', {
        request_id: crypto.randomUUID(), card_number: cardNumber, point_of_sale: till, points,
      });
      throw new Error('AuthorizeHold for more points than the card has was not refused');
    } catch (error) {
      report('AuthorizeHold', error);
    }
    try {
      await call(client, 'AuthorizeHold', {
        request_id: 'not-a-uuid', card_number: cardNumber, point_of_sale: { ...till, channel: 'CHANNEL_UNSPECIFIED' },
        points: '-5',
      });
      throw new Error('AuthorizeHold with bad input was not refused');
    } catch (error) {
      report('AuthorizeHold with bad input', error);
    }
  } finally {
    client.close();
  }
}

if (process.argv.length !== 4) {
  console.error('usage: node error_details.js HOST:PORT CARD_NUMBER');
  process.exit(2);
}
main(process.argv[2], process.argv[3]).catch((error) => {
  console.error(error);
  process.exit(1);
});
