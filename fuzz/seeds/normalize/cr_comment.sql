select --'
CANARY' as c --'
