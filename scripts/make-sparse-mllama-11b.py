#!/usr/bin/env python3
# Writes Llama 3.2 11B Vision as tests/real_scale.rs does: the hub config, every tensor name and shape as sparse
# zero-filled bf16 shards (no disk used), the tiny fixtures tokenizer with the real special-token ids.
#   python3 scripts/make-sparse-mllama-11b.py OUT_DIR
import json, struct, os, sys
d=sys.argv[1]; os.makedirs(d, exist_ok=True)
root=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
import shutil; shutil.copy(root+'/tests/data/mllama-11b-config.json', d+'/config.json')
t=json.load(open(root+'/tests/fixtures/tiny-mllama-a/tokenizer.json'))
remap=lambda i: i-368+128000 if 368<=i<=383 else (128256 if i==384 else i)
for tok in t['added_tokens']:
    tok['id']=remap(tok['id']); t['model']['vocab'][tok['content']]=tok['id']
for p in t['post_processor']['processors']:
    if p['type']=='TemplateProcessing':
        for s in p['special_tokens'].values(): s['ids']=[remap(i) for i in s['ids']]
json.dump(t, open(d+'/tokenizer.json','w'))
shapes=json.load(open(root+'/tests/data/mllama-11b-shapes.json'))['tensors']
items=list(shapes.items()); n=5; per=(len(items)+n-1)//n; wm={}
for s in range(n):
    chunk=items[s*per:(s+1)*per]; f=f'model-{s+1:05}-of-{n:05}.safetensors'; h={}; off=0
    for name,shape in chunk:
        b=2
        for x in shape: b*=x
        h[name]={'dtype':'BF16','shape':shape,'data_offsets':[off,off+b]}; off+=b; wm[name]=f
    js=json.dumps(h)
    while len(js)%8: js+=' '
    with open(d+'/'+f,'wb') as fh:
        fh.write(struct.pack('<Q',len(js))); fh.write(js.encode()); fh.truncate(8+len(js)+off)
json.dump({'metadata':{},'weight_map':wm}, open(d+'/model.safetensors.index.json','w'))
